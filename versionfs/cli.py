"""Command line: argument parsing, then one call per command; no logic here."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Iterator, Sequence

from . import __version__, logs
from .control import request
from .errors import EXIT_ERROR, UserError, exit_code



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="versionfs", description="Browse, diff and restore the history of data as ordinary directories.")
    p.add_argument("--version", action="version", version=f"versionfs {__version__}")
    p.add_argument("--debug", action="store_true", help="log details and show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount a source; returns once the mount is usable")
    m.add_argument("source", help="a versioned .h5 file (or s3://bucket/prefix)")
    m.add_argument("mountpoint")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS", help="mount options, comma separated (ro, allow_other, ...)")
    m.add_argument("--state-dir", help="where logs and staged data live (default: $XDG_STATE_HOME/versionfs)")
    m.add_argument("--autocommit", type=float, metavar="SECONDS", help="commit staging once it has been idle this long")
    m.add_argument("--endpoint-url", help="S3: the endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    m.add_argument("--cache-dir", help="where S3 object versions and built .h5 images are kept (default: $XDG_CACHE_HOME/versionfs)")
    m.add_argument("--cache-size", type=_size, default=None, metavar="SIZE", help="S3: the cache's bound, e.g. 512M or 20G (default 4G)")
    m.add_argument("--readahead-memory", type=_size, default=None, metavar="SIZE",
                   help="memory all open files together may hold read ahead, e.g. 256M (default 512M)")
    m.add_argument("--store-timeout", type=float, default=None, metavar="SECONDS",
                   help="S3: a read the store has not answered within this long, retries included, fails with EIO (default 30)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    c = sub.add_parser("commit", help="turn staging/ into the next version")
    c.add_argument("mountpoint")
    c.add_argument("-n", "--name", help="the new version's name (default: its UTC time)")
    c.add_argument("-m", "--message", help="a message stored with the version")

    st = sub.add_parser("status", help="staged changes: A added, M modified, D deleted")
    st.add_argument("mountpoint")

    dc = sub.add_parser("discard", help="drop every staged change")
    dc.add_argument("mountpoint")

    rb = sub.add_parser("rollback", help="commit the content of an earlier version as a new version")
    rb.add_argument("mountpoint")
    rb.add_argument("selector", help="a version name or a selector (@-2, @2024-01-15, …)")
    rb.add_argument("-n", "--name", help="the new version's name")
    rb.add_argument("-m", "--message")

    u = sub.add_parser("umount", help="unmount and wait for the daemon to finish")
    u.add_argument("mountpoint")

    lg = sub.add_parser("log", help="list versions, oldest first")
    lg.add_argument("source", help="a source or a versionfs mount point")
    lg.add_argument("--json", action="store_true", help="machine-readable output")
    lg.add_argument("--endpoint-url", help="S3: the endpoint (default: $AWS_ENDPOINT_URL, else AWS)")

    cp = sub.add_parser("compact", help="S3: remove consecutive duplicate versions of each key")
    cp.add_argument("source")
    cp.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    cp.add_argument("--endpoint-url", help="S3: the endpoint (default: $AWS_ENDPOINT_URL, else AWS)")

    i = sub.add_parser("init", help="create an empty versioned HDF5 file, or enable versioning on a bucket")
    i.add_argument("source")
    i.add_argument("--endpoint-url", help="S3: the endpoint (default: $AWS_ENDPOINT_URL, else AWS)")

    h = sub.add_parser("mount-helper", help=argparse.SUPPRESS)  # mount.fuse.versionfs (mount(8))
    h.add_argument("argv", nargs=argparse.REMAINDER)

    d = sub.add_parser("demo", help="make a small versioned HDF5 file, mount it, print what to try")
    d.add_argument("directory", nargs="?", default="versionfs-demo")
    return p


def _size(text: str) -> int:
    """``512M``, ``20G``, ``1048576``: a size in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (like 512M or 20G)") from None


def _mount_options(raw: list[str]) -> list[str]:
    return [o for group in raw for o in group.split(",") if o]


def _mount(args: argparse.Namespace) -> None:
    from . import daemon

    opts = daemon.MountOptions(
        args.source, args.mountpoint, _mount_options(args.options), args.debug, args.state_dir, args.autocommit,
        args.endpoint_url, args.cache_dir,
    )
    if args.cache_size is not None:
        opts.cache_bytes = args.cache_size
    if args.readahead_memory is not None:
        opts.readahead_bytes = args.readahead_memory
    if args.store_timeout is not None:
        opts.store_timeout = args.store_timeout
    if args.foreground:
        daemon.serve(opts, daemon.ready_writer(args.ready_fd))
        return
    child = ["mount", args.source, os.path.abspath(args.mountpoint), "-f"]
    child += [f"-o{o}" for o in opts.fuse_options]
    child += ["--state-dir", args.state_dir] if args.state_dir else []
    child += ["--autocommit", str(args.autocommit)] if args.autocommit else []
    child += ["--endpoint-url", args.endpoint_url] if args.endpoint_url else []
    child += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    child += ["--cache-size", str(args.cache_size)] if args.cache_size is not None else []
    child += ["--readahead-memory", str(args.readahead_memory)] if args.readahead_memory is not None else []
    child += ["--store-timeout", str(args.store_timeout)] if args.store_timeout is not None else []
    daemon.start_background((["--debug"] if args.debug else []) + child, args.mountpoint, args.state_dir)


def _demo(args: argparse.Namespace) -> None:
    from . import daemon, demo

    source, mnt = demo.demo_paths(args.directory)
    os.makedirs(mnt, exist_ok=True)
    if daemon.is_mountpoint(mnt):
        daemon.unmount(mnt)
    demo.make_demo_file(source)
    daemon.start_background(["mount", source, mnt, "-f"], mnt, None)
    print(demo.instructions(source, mnt), end="")


def _health_line(health: dict) -> str:
    """One line for people (on stderr: stdout stays the list of changes)."""
    state = "healthy" if not health["errors"] else f"running, {health['errors']} request(s) failed (see its log)"
    base = health["base"] if health["base"] == health["latest"] else f"{health['base']} (latest is {health['latest']})"
    return (
        f"daemon {health['pid']} {state}, up {health['uptime']:.0f}s; {health['source']}: "
        f"{health['versions']} versions, staging on {base}"
        + (f", {health['open_for_writing']} file(s) open for writing" if health["open_for_writing"] else "")
    )


@contextlib.contextmanager
def _progress_bar(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=what, unit="change", leave=False, file=sys.stderr) as bar:
        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        yield update


def _run(args: argparse.Namespace) -> None:
    if args.command == "mount":
        _mount(args)
    elif args.command == "umount":
        from .daemon import unmount

        unmount(args.mountpoint)
    elif args.command == "log":
        from .admin import log_lines

        print("\n".join(log_lines(args.source, args.json, args.endpoint_url)))
    elif args.command == "compact":
        from .admin import compact

        for line in compact(args.source, args.dry_run, args.endpoint_url):
            print(line)
    elif args.command == "init":
        from .admin import init

        print(init(args.source, args.endpoint_url))
    elif args.command == "demo":
        _demo(args)
    elif args.command == "mount-helper":
        from .mount_helper import mount_argv

        command, fake = mount_argv(args.argv)
        if fake:
            print("versionfs", *command)
            return
        _run(_parser().parse_args(command))
    elif args.command == "commit":
        with _progress_bar("commit") as on_progress:
            name = request(args.mountpoint, "commit", on_progress, name=args.name, message=args.message)
        print(name or "unchanged")
    elif args.command == "status":
        print(_health_line(request(args.mountpoint, "health")), file=sys.stderr)
        for line in request(args.mountpoint, "status"):
            print(line)
    elif args.command == "discard":
        request(args.mountpoint, "discard")
    elif args.command == "rollback":
        with _progress_bar("rollback") as on_progress:
            name = request(args.mountpoint, "rollback", on_progress, selector=args.selector, name=args.name, message=args.message)
        print(name or "unchanged")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.debug)
    try:
        _run(args)
    except UserError as e:
        print(f"versionfs: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line unless --debug
        if args.debug:
            raise
        print(f"versionfs: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0
