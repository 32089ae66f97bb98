"""The one table of mount options.

Each daemon option is written here once; everything else is generated from
``OPTIONS``: the ``versionfs mount`` flags (``--cache-size 20G``), the
``-o``/fstab names (``cache_size=20G``, also what ``mount.fuse.versionfs``
passes on), the attributes of ``MountOptions`` the daemon reads, and the
arguments a background mount gives its foreground child. ``-o`` names that are
not in the table go to FUSE; mount(8)'s and fstab's own (``IGNORED``, ``x-*``)
are dropped by the mount helper.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable, Iterable

from .backends import DEFAULT_CACHE_BYTES, DEFAULT_STORE_TIMEOUT
from .errors import UserError

DEFAULT_READAHEAD_BYTES = 512 << 20  # read-ahead memory of all open files together (cache.ReadAheadBudget)

# mount(8)'s and fstab's own options: never passed to FUSE (the mount helper drops them).
IGNORED = frozenset({"_netdev", "nofail", "noauto", "auto", "user", "users", "nouser", "owner", "group", "defaults",
                     "comment"})


def seconds(text: str) -> float:
    """``300``, ``2.5``: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"not a number of seconds: {text!r} (like 300 or 2.5)")
    return value


def seconds_or_never(text: str) -> float:
    """``5``, ``0.5``, or ``0`` for never."""
    return 0.0 if text.strip() in ("0", "0.0") else seconds(text)


def size(text: str) -> int:
    """``512M``, ``20G``, ``1048576``: a size in bytes (K, M, G, T are powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        value = int(float(clean[:-1]) * units[clean[-1]]) if clean and clean[-1] in units else int(clean)
    except (ValueError, OverflowError):
        value = -1
    if value < 0:
        raise ValueError(f"not a size: {text!r} (like 512M or 20G)")
    return value


def text(value: str) -> str:
    if not value:
        raise ValueError("empty")
    return value


@dataclass(frozen=True)
class Option:
    """One daemon option: ``name`` is its ``-o``/fstab name and its attribute of
    ``MountOptions``; ``--name-with-dashes`` is its flag."""

    name: str
    parse: Callable[[str], Any]
    metavar: str
    help: str
    default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, raw: str, where: str) -> Any:
        try:
            return self.parse(raw)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None


OPTIONS: tuple[Option, ...] = (
    Option("state_dir", text, "DIR", "where logs and staged data live (default: $XDG_STATE_HOME/versionfs)"),
    Option("autocommit", seconds, "SECONDS", "commit staging once it has been idle this long (default: never)"),
    Option("endpoint_url", text, "URL", "S3: the endpoint (default: $AWS_ENDPOINT_URL, else AWS)"),
    Option("cache_dir", text, "DIR",
           "where S3 object versions and built .h5 images are kept (default: $XDG_CACHE_HOME/versionfs)"),
    Option("cache_size", size, "SIZE", "the cache's bound, e.g. 512M or 20G (default 4G)", DEFAULT_CACHE_BYTES),
    Option("readahead_memory", size, "SIZE", "memory all open files together may hold read ahead, e.g. 256M "
           "(default 512M)", DEFAULT_READAHEAD_BYTES),
    Option("poll", seconds_or_never, "SECONDS", "S3: look for other writers' versions this often "
           "(default 5; 0: never)"),
    Option("store_timeout", seconds, "SECONDS", "S3: a read the store has not answered within this long, retries "
           "included, fails with EIO (default 30)", DEFAULT_STORE_TIMEOUT),
)
BY_NAME = {o.name: o for o in OPTIONS}

MountOptions = make_dataclass(
    "MountOptions",
    [("source", str), ("mountpoint", str), ("fuse_options", list, field(default_factory=list)), ("debug", bool, False)]
    + [(o.name, Any, o.default) for o in OPTIONS],
    namespace={
        "__doc__": "What one mount was asked for: source, mount point, FUSE options and every option of OPTIONS.",
        "read_only": property(lambda self: "ro" in self.fuse_options),
    },
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The table's flags on ``versionfs mount`` (unset: None, so ``-o`` can fill them)."""
    for option in OPTIONS:
        parser.add_argument(option.flag, dest=option.name, type=_argparse_type(option), metavar=option.metavar,
                            help=option.help + f"; -o {option.name}=…")


def _argparse_type(option: Option) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            return option.parse(raw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = option.name  # argparse names the type in its message
    return parse


def split_words(groups: Iterable[str]) -> list[str]:
    """``["ro,allow_other", "cache_size=1G"]`` -> each option."""
    return [word for group in groups for word in group.split(",") if word]


def from_arguments(source: str, mountpoint: str, o_groups: Iterable[str], flags: dict[str, Any],
                   debug: bool = False) -> Any:
    """MountOptions from ``-o`` groups and flags (a flag wins over ``-o``, either
    over the default). ``-o`` names outside the table are FUSE's."""
    values: dict[str, Any] = {}
    fuse: list[str] = []
    for word in split_words(o_groups):
        name, equals, raw = word.partition("=")
        option = BY_NAME.get(name)
        if option is None:
            fuse.append(word)
        elif not equals:
            raise UserError(f"mount option {name} needs a value ({name}={option.metavar})")
        else:
            values[name] = option.value(raw, f"mount option {word}")
    for name, value in flags.items():
        if value is not None:
            values[name] = value
    return MountOptions(source, mountpoint, fuse, debug, **values)


def to_arguments(opts: Any) -> list[str]:
    """The flags that give ``opts`` again (a background mount's foreground child)."""
    out = [f"-o{o}" for o in opts.fuse_options]
    for option in OPTIONS:
        value = getattr(opts, option.name)
        if value != option.default:
            out += [option.flag, str(value)]
    return out
