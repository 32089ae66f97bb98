"""Command line: argument parsing, then one call per command, then printing
(text for people, ``--json`` for programs); no logic here."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
from dataclasses import asdict
from typing import Any, Callable, Iterator, Sequence

from . import __version__, logs, options
from .control import request
from .errors import EXIT_CONFLICT, EXIT_ERROR, ControlError, UserError, exit_code

EXIT_USAGE = 2  # argparse's, for wrong arguments; also diff's "trouble", as diff(1) and cmp(1)
EXIT_INTERRUPTED = 130

SOURCE = "a versioned HDF5 file (FILE.h5) or an S3 prefix (s3://BUCKET[/PREFIX])"
MOUNTPOINT = "a versionfs mount point, or any path inside one"
WHERE = "a source (FILE.h5, s3://BUCKET/PREFIX), a versionfs mount point, or any path inside a mount"
SELECTOR = "a version's name, or a selector: @-1 (latest), @-2, @0 (first), @2024-01-15, @2024-01-15T10:30+02:00"
EXIT_CODES = f"""\
exit codes:
  0    success
  1    an error, said in one line on stderr (diff: the versions differ)
  {EXIT_USAGE}    wrong arguments (diff: an error)
  {EXIT_CONFLICT}    commit, rollback: a conflict with another writer; staging is kept
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""
COMMAND_EXIT_CODES = f"""\
exit codes:
  0    success
  1    an error, said in one line on stderr
  {EXIT_USAGE}    wrong arguments"""
CONFLICT_EXIT_CODES = COMMAND_EXIT_CODES + f"\n  {EXIT_CONFLICT}    a conflict with another writer; staging is kept"
DIFF_EXIT_CODES = f"""\
exit codes (as diff(1)):
  0    no differences
  1    the versions differ
  {EXIT_USAGE}    an error, said in one line on stderr, or wrong arguments"""


class _Formatter(argparse.HelpFormatter):
    """Wraps paragraphs to the terminal; keeps indented lines (examples, exit
    codes) as they are written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(line and not line.startswith(" ") and textwrap.fill(line, width, initial_indent=indent,
                                                                               subsequent_indent=indent)
                         or indent + line for line in text.splitlines())


class _Parser(argparse.ArgumentParser):
    """Wrong arguments are one line too, pointing at the help (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def _command(sub: Any, name: str, summary: str, description: str, examples: str,
             codes: str = COMMAND_EXIT_CODES) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description, epilog=f"examples:\n{examples}\n\n{codes}",
                          formatter_class=_Formatter)


def _where(p: argparse.ArgumentParser, name: str, text: str, complete: str = "file") -> None:
    p.add_argument(name, metavar=name.upper(), help=text).completes = complete


def _completion(shell: str) -> str:
    """The completion script, from the parser itself (shtab): paths complete as
    files or directories as each argument says (``completes``)."""
    import shtab

    p = parser()
    stack = [p]
    while stack:
        for action in stack.pop()._actions:
            kind = getattr(action, "completes", None)
            if kind:
                action.complete = shtab.DIRECTORY if kind == "directory" else shtab.FILE
            if isinstance(action, argparse._SubParsersAction):
                stack += action.choices.values()
    return shtab.complete(p, shell=shell)


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON (same fields as the text)")


def _endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", metavar="URL", help="S3: the endpoint (default: the mount's, else $AWS_ENDPOINT_URL, else AWS)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="versionfs", formatter_class=_Formatter,
        description="Browse, diff and restore the history of data (a versioned HDF5 file or an S3 prefix) as "
                    "ordinary directories: every version is a read-only directory, staging/ becomes the next one.",
        epilog="Run 'versionfs COMMAND --help' for a command's arguments and examples.\n\n" + EXIT_CODES)
    p.add_argument("--version", action="version", version=f"versionfs {__version__}")
    p.add_argument("--debug", action="store_true", help="log details and show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = _command(sub, "mount", "mount a source; returns once the mount is usable",
                 "Mount SOURCE on MOUNTPOINT (an empty directory): latest/, versions/<name>/, @<selector>/, "
                 "history/<path>/ and a writable staging/. Returns once the mount answers; the daemon then "
                 "serves in the background (its log: $XDG_STATE_HOME/versionfs/logs/).",
                 "  versionfs mount weather.h5 /mnt/weather\n"
                 "  versionfs mount weather.h5 /mnt/weather -o ro,allow_other\n"
                 "  versionfs mount s3://archive/stations /mnt/stations --endpoint-url http://minio:9000 -o cache_size=20G")
    _where(m, "source", SOURCE)
    _where(m, "mountpoint", "an empty directory to mount on", "directory")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, logging to stderr")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="comma-separated mount options: FUSE's (ro, allow_other, ...) and each option below by "
                        "its name (state_dir=DIR, cache_size=SIZE, ...), as fstab passes them")
    options.add_arguments(m)
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = _command(sub, "umount", "unmount and wait for the daemon to finish",
                 "Unmount a versionfs mount and wait until its daemon has exited (after a commit that is running).",
                 "  versionfs umount /mnt/weather")
    _where(u, "mountpoint", "the mount point (exactly)", "directory")

    c = _command(sub, "commit", "turn staging/ into the next version",
                 "Make what is in staging/ the next version and print its name, or 'unchanged' when staging "
                 "equals the latest version (then no version is made).",
                 "  versionfs commit /mnt/weather -m 'March readings'\n"
                 "  versionfs commit /mnt/weather -n 2024-03", CONFLICT_EXIT_CODES)
    _where(c, "mountpoint", MOUNTPOINT, "directory")
    c.add_argument("-n", "--name", help="the new version's name (HDF5; default: its UTC time, 2024-04-01T061200Z)")
    c.add_argument("-m", "--message", help="a message stored with the version")
    _json(c)

    st = _command(sub, "status", "staged changes: A added, M modified, D deleted",
                  "The changes a commit would make, one per line (A added, M modified, D deleted; directories end "
                  "in /), and the daemon's health on stderr.",
                  "  versionfs status /mnt/weather\n  cd /mnt/weather/staging/daily && versionfs status .")
    _where(st, "mountpoint", MOUNTPOINT, "directory")
    _json(st)

    dc = _command(sub, "discard", "drop every staged change", "Drop every staged change: staging/ is latest/ again.",
                  "  versionfs discard /mnt/weather")
    _where(dc, "mountpoint", MOUNTPOINT, "directory")

    rb = _command(sub, "rollback", "commit an earlier version's content as a new version",
                  "Commit the content of the version SELECTOR picks as a new version (history is never rewritten). "
                  "Prints the new version's name, or 'unchanged' when the latest version has that content already "
                  "(a time in the future selects the latest version). Refused while staging has changes.",
                  "  versionfs rollback /mnt/weather @-2\n  versionfs rollback /mnt/weather 2024-02 -m 'undo the fix'",
                  CONFLICT_EXIT_CODES)
    _where(rb, "mountpoint", MOUNTPOINT, "directory")
    rb.add_argument("selector", metavar="SELECTOR", help=SELECTOR)
    rb.add_argument("-n", "--name", help="the new version's name")
    rb.add_argument("-m", "--message", help="a message (default: 'rollback to <version>')")
    _json(rb)

    lg = _command(sub, "log", "list versions, oldest first, with their messages",
                  "Versions oldest first by time: position (@N), name, UTC time, message; the current one is marked. "
                  "With a FILE (or a path of one in a mount), only the versions in which that file changed, as its "
                  "history/ shows them (A added, M modified, D deleted). HDF5's empty __first_version__ is left out: "
                  "it holds nothing and is never a selector's answer, so line N is @N.",
                  "  versionfs log weather.h5\n  versionfs log /mnt/weather/latest/daily/temperature.npy\n"
                  "  versionfs log weather.h5 daily/temperature.npy -n 5 --since 2024-02-01")
    _where(lg, "source", WHERE)
    lg.add_argument("file", nargs="?", metavar="FILE", help="a file's path in the versions (daily/temperature.npy)")
    lg.add_argument("-n", "--max-count", type=_positive, metavar="N", help="only the last N versions")
    lg.add_argument("--since", metavar="TIME", help="only versions at or after TIME (2024-01-15, 2024-01-15T10:30, …)")
    lg.add_argument("--until", metavar="TIME", help="only versions at or before TIME")
    _json(lg)
    _endpoint(lg)

    sh = _command(sub, "show", "which version a selector picks; a file's history entry",
                  "Which version SELECTOR picks: its name, position, time, parent and message. With a PATH, "
                  "that file as the version has it: its entry in history/<PATH>/ and the version that last changed it.",
                  "  versionfs show weather.h5 @-2\n  versionfs show /mnt/weather @2024-03-02 daily/temperature.npy")
    _where(sh, "source", WHERE)
    sh.add_argument("selector", metavar="SELECTOR", help=SELECTOR)
    sh.add_argument("path", nargs="?", metavar="PATH", help="a file's path in the versions")
    _json(sh)
    _endpoint(sh)

    df = _command(sub, "diff", "what changed between two versions, without reading data",
                  "Files added (A), removed (D) and modified (M) from version OLD to NEW, below each PATH if given, "
                  "answered from the format's metadata: HDF5 compares shapes, dtypes and chunk mappings (chunks are "
                  "content-addressed), S3 VersionIds and stored checksums. --stat adds the changed chunks or sizes. "
                  "The root's .version.json (which names the version, so always differs) is left out.",
                  "  versionfs diff weather.h5 2024-02 2024-02-fix\n  versionfs diff /mnt/weather @-2 @-1 --stat daily",
                  DIFF_EXIT_CODES)
    _where(df, "source", WHERE)
    df.add_argument("old", metavar="OLD", help=SELECTOR)
    df.add_argument("new", metavar="NEW", help="the same forms as OLD")
    df.add_argument("paths", nargs="*", metavar="PATH", help="only below these paths of the versions")
    form = df.add_mutually_exclusive_group()
    form.add_argument("--stat", action="store_true", help="with each file's changed chunks (HDF5) or sizes")
    form.add_argument("--name-only", action="store_true", help="only the paths")
    _json(df)
    _endpoint(df)

    cp = _command(sub, "compact", "S3: remove consecutive duplicate versions of each key",
                  "S3: remove each object version whose content equals the key's previous version (never across a "
                  "delete marker), keeping the first of each run; prints each removal.",
                  "  versionfs compact s3://archive/stations --dry-run")
    _where(cp, "source", "an S3 prefix (s3://BUCKET[/PREFIX])")
    cp.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    _json(cp)
    _endpoint(cp)

    i = _command(sub, "init", "create an empty versioned HDF5 file, or enable versioning on a bucket",
                 "Create an empty versioned HDF5 file (refusing an existing path), or turn on versioning of a bucket.",
                 "  versionfs init new.h5\n  versionfs init s3://archive --endpoint-url http://minio:9000")
    _where(i, "source", SOURCE)
    _endpoint(i)

    d = _command(sub, "demo", "make a small versioned HDF5 file, mount it, print what to try",
                 "Write DIRECTORY/weather.h5 (three versions of a weather-station archive), mount it on "
                 "DIRECTORY/mnt and print commands to try.", "  versionfs demo /tmp/versionfs-demo")
    d.add_argument("directory", nargs="?", default="versionfs-demo", help="where (default: ./versionfs-demo)").completes = "directory"

    co = _command(sub, "completion", "print the shell completion script (bash or zsh)",
                  "Print a completion script for bash or zsh ('make install' installs both).",
                  "  versionfs completion zsh > ~/.zfunc/_versionfs\n  source <(versionfs completion bash)")
    co.add_argument("shell", choices=["bash", "zsh"])
    return p


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return int(text)


# -- the commands ---------------------------------------------------------------------------
def _mount(args: argparse.Namespace) -> None:
    from . import daemon

    flags = {o.name: getattr(args, o.name) for o in options.OPTIONS}
    opts = options.from_arguments(args.source, args.mountpoint, args.options, flags, args.debug)
    if args.foreground:
        daemon.serve(opts, daemon.ready_writer(args.ready_fd))
        return
    child = ["mount", args.source, os.path.abspath(args.mountpoint), "-f", *options.to_arguments(opts)]
    daemon.start_background((["--debug"] if args.debug else []) + child, args.mountpoint, opts.state_dir)


def _demo(args: argparse.Namespace) -> None:
    from . import daemon, demo

    source, mnt, state = demo.demo_paths(args.directory)
    os.makedirs(mnt, exist_ok=True)
    if daemon.is_mountpoint(mnt):
        daemon.unmount(mnt)
    demo.make_demo_file(source, state)
    daemon.start_background(["mount", source, mnt, "-f", "--state-dir", state], mnt, state)
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
def _progress_bar(what: str) -> Iterator[Callable[[int, int, int, int], None] | None]:
    """Bytes done with rate and ETA, and files, on stderr when it is a terminal;
    nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr,
              dynamic_ncols=True) as bar:
        def update(files_done: int, files: int, bytes_done: int, nbytes: int) -> None:
            bar.total = nbytes
            bar.set_postfix_str(f"{files_done}/{files} files", refresh=False)
            bar.update(bytes_done - bar.n)  # through update(), so tqdm keeps a rate
            bar.refresh()

        yield update


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


def _size_text(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _log(args: argparse.Namespace) -> int:
    from .admin import locate, log

    where = locate(args.source, args.endpoint_url)
    entries = log(where, args.file or where.path or None, args.max_count, args.since, args.until)
    if args.json:
        _print_json([asdict(e) for e in entries])
        return 0
    width = max((len(e.name) for e in entries), default=0)
    digits = max((len(str(e.position)) for e in entries), default=1)
    for e in entries:
        change = f"{e.change} " if e.change else ""
        when = "" if e.timestamp == e.name else e.timestamp  # S3: the name is the time
        words = [f"{change}@{e.position:<{digits}}", f"{e.name:<{width}}", when, "(current)" if e.current else "",
                 e.message or ""]
        print("  ".join(filter(None, words)).rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    from .admin import locate, show

    where = locate(args.source, args.endpoint_url)
    shown = show(where, args.selector, args.path or where.path or None)
    if args.json:
        _print_json(asdict(shown))
        return 0
    place = f"@{shown.position} of {shown.of}" if shown.position is not None else "a placeholder, never a selector's answer"
    rows = [("version", f"{shown.name}  ({place}{', current' if shown.current else ''})"), ("time", shown.timestamp),
            ("parent", shown.previous or "-"), ("message", shown.message or "-")]
    if shown.path:
        rows += [("file", shown.path), ("entry", shown.entry),
                 ("changed in", shown.changed_in + ("  (deleted there)" if shown.deleted else "")),
                 ("size", "-" if shown.deleted else f"{shown.size} bytes")]
    for key, value in rows:
        print(f"{key + ':':<12}{value}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from .admin import diff, locate

    where = locate(args.source, args.endpoint_url)
    result = diff(where, args.old, args.new, args.paths or ([where.path] if where.path else []))
    if args.json:
        _print_json({"old": result.old, "new": result.new, "differences": [
            {"status": d.status, "path": d.path, **(asdict(d.delta) if d.delta else {})} for d in result.differences]})
    elif args.name_only:
        for d in result.differences:
            print(d.path)
    elif args.stat:
        width = max((len(d.path) for d in result.differences), default=0)
        for d in result.differences:
            print(f" {d.status} {d.path:<{width}}  {_stat_text(d.delta)}".rstrip())
        counts = {s: sum(d.status == s for d in result.differences) for s in "AMD"}
        print(f" {len(result.differences)} changed: {counts['A']} added, {counts['M']} modified, {counts['D']} removed")
    else:
        for d in result.differences:
            print(f"{d.status} {d.path}")
    return 1 if result.differences else 0


def _stat_text(delta: Any) -> str:
    if delta is None:
        return ""
    parts = []
    if delta.chunks is not None:
        parts.append(f"{delta.chunks.changed} of {delta.chunks.total} chunks")
    if delta.changed_bytes is not None:
        parts.append(f"{_size_text(delta.changed_bytes)} changed")
    if delta.old_size != delta.new_size:
        parts.append(f"size {_size_text(delta.old_size)} -> {_size_text(delta.new_size)}")
    return ", ".join(parts + list(delta.notes))


def _commit(args: argparse.Namespace) -> int:
    from .mounts import mount_root

    with _progress_bar("commit") as on_progress:
        name = request(mount_root(args.mountpoint), "commit", on_progress, name=args.name, message=args.message)
    if args.json:
        _print_json({"version": name})
    else:
        print(name or "unchanged")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from .mounts import mount_root

    mnt = mount_root(args.mountpoint)
    try:
        selected = request(mnt, "select", selector=args.selector)
    except ControlError:
        selected = None  # a daemon started before versionfs had "select": rollback still works
    with _progress_bar("rollback") as on_progress:
        name = request(mnt, "rollback", on_progress, selector=args.selector, name=args.name, message=args.message)
    if args.json:
        _print_json({"version": name, "selected": selected["name"] if selected else None})
        return 0
    print(name or "unchanged")
    if name is None and selected is not None:
        why = ("the latest version (a time in the future selects the latest)" if selected["latest"]
               else "whose content the latest version has already")
        print(f"versionfs: {args.selector} selects {selected['name']}, {why}: nothing to roll back", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    from .mounts import mount_root

    mnt = mount_root(args.mountpoint)
    health = request(mnt, "health")
    lines = request(mnt, "status")
    if args.json:
        _print_json({"daemon": health, "changes": [{"code": line[0], "path": line[2:]} for line in lines]})
        return 0
    print(_health_line(health), file=sys.stderr)
    for line in lines:
        print(line)
    return 0


def _compact(args: argparse.Namespace) -> int:
    from .admin import compact

    removals = compact(args.source, args.dry_run, args.endpoint_url)
    if args.json:
        _print_json([asdict(r) for r in removals])
        return 0
    for r in removals:
        print(f"{'removed' if r.removed else 'would remove'} {r.key} version {r.version_id} ({r.modified}): "
              f"same as {r.same_as}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "mount":
        _mount(args)
    elif args.command == "umount":
        from .daemon import unmount

        unmount(args.mountpoint)
    elif args.command == "init":
        from .admin import init

        print(init(args.source, args.endpoint_url))
    elif args.command == "demo":
        _demo(args)
    elif args.command == "discard":
        from .mounts import mount_root

        request(mount_root(args.mountpoint), "discard")
    elif args.command == "completion":
        print(_completion(args.shell), end="")
    else:
        return COMMANDS[args.command](args)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "log": _log, "show": _show, "diff": _diff, "commit": _commit, "rollback": _rollback, "status": _status,
    "compact": _compact,
}


def _mount_helper(argv: Sequence[str]) -> int:
    """``versionfs mount-helper …``: what mount.fuse.versionfs runs (not a command of --help)."""
    from .mount_helper import mount_argv

    command, fake = mount_argv(argv)
    if fake:
        print("versionfs", *command)
        return 0
    return main(command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mount-helper"]:
        return _mount_helper(argv[1:])
    args = parser().parse_args(argv)
    logs.setup(args.debug)
    trouble = EXIT_USAGE if args.command == "diff" else None  # diff(1): 1 means "they differ"
    try:
        return _run(args)
    except UserError as e:
        print(f"versionfs: {e}", file=sys.stderr)
        return trouble or exit_code(e)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout went away (| head): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as e:  # a system call's answer: its path and reason
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"versionfs: {where}{e.strerror or e}", file=sys.stderr)
        return trouble or EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - one clear line unless --debug
        if args.debug:
            raise
        print(f"versionfs: internal error: {e} (run with --debug for the traceback)", file=sys.stderr)
        return trouble or EXIT_ERROR
