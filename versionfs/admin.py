"""Commands that read a source directly, without asking a daemon: log, show,
diff, init, compact. Each returns records; cli.py prints them (text or JSON).

A mount point, or any path inside a mount, stands for the mount's source (read
from the root's ``user.versionfs.source`` xattr) and for the path of a version's
tree it shows (``MNT/latest/a/b.npy`` -> ``a/b.npy``).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from .backends import backend_class, create_source, is_store_url, open_backend
from .backends.base import Backend, Dir, File, FileDelta, VersionInfo, find, join
from .mounts import XATTR_ENDPOINT, XATTR_SOURCE, versionfs_mount_of
from .errors import SourceError, UserError
from .namespace import history_listing
from .selectors import VersionIndex, choose, format_utc, parse_time


# -- where a command points --------------------------------------------------------------
@dataclass(frozen=True)
class Location:
    source: str
    endpoint_url: str | None = None
    mountpoint: str | None = None  # the mount's root, when a path in a mount was given
    path: str | None = None  # the path in a version's tree it stands for ('' the top; None: none)


def locate(given: str, endpoint_url: str | None = None) -> Location:
    """A source (``FILE.h5``, ``s3://…``), a mount point, or any path in a mount."""
    if is_store_url(given):
        return Location(given, endpoint_url)
    mountpoint = versionfs_mount_of(given)
    if mountpoint is None:
        if os.path.isdir(given):
            raise SourceError(f"{given}: a directory, but not in a versionfs mount")
        return Location(given, endpoint_url)
    try:
        source = os.fsdecode(os.getxattr(mountpoint, XATTR_SOURCE))
    except OSError as e:
        raise SourceError(f"{mountpoint}: a versionfs mount that does not answer ({e.strerror})") from None
    try:
        endpoint_url = endpoint_url or os.fsdecode(os.getxattr(mountpoint, XATTR_ENDPOINT))
    except OSError:
        pass
    return Location(source, endpoint_url, mountpoint, tree_path(mountpoint, given))


def tree_path(mountpoint: str, given: str) -> str | None:
    """The path in a version's tree that a path in a mount shows: ``latest/a``,
    ``versions/v/a``, ``@-2/a``, ``staging/a`` and ``history/a[/entry]`` all stand
    for ``a``; the root, ``versions/`` and the ``.h5`` images for none."""
    parts = os.path.relpath(os.path.realpath(given), mountpoint).split(os.sep)
    if parts == ["."]:
        return None
    head, rest = parts[0], parts[1:]
    if head == "versions":
        if not rest:
            return None
        rest = rest[1:]  # versions/<name>/…
    elif head == "history":
        if rest and os.path.isfile(given):
            rest = rest[:-1]  # an entry of a file's history: that file
    elif head not in ("latest", "staging") and not head.startswith("@"):
        return None  # latest.h5
    return "/".join(rest)


class Opened:
    """A source's backend and its versions, as the mount sees them."""

    def __init__(self, location: Location):
        self.location = location
        self.backend: Backend = open_backend(location.source, location.endpoint_url)
        try:
            self.versions = self.backend.versions()
            self.current = self.backend.current()
        except BaseException:
            self.backend.close()
            raise
        self.by_name = {v.name: v for v in self.versions}
        # As in the mount: selectors count real versions (never a placeholder).
        self.real = [v for v in self.versions if not v.placeholder]
        self.index = VersionIndex(self.real, [v.timestamp for v in self.real], [v.name for v in self.real])
        self.position = {v.name: i for i, v in enumerate(self.real)}

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc: object) -> None:
        self.backend.close()

    def select(self, text: str) -> VersionInfo:
        info = choose(text, self.index, self.by_name)
        if info is None:
            raise UserError(f"no version of {self.backend.description} matches {text!r} "
                            "(a version name, @-1, @0, @2024-01-15, … ; see versionfs log)")
        return info

    def require_versions(self) -> None:
        if not self.real:
            raise UserError(f"{self.backend.description}: no versions: nothing was ever committed there "
                            "(is the name right? a first version is made through a mount's staging/)")


def short_utc(instant: dt.datetime) -> str:
    """``2024-03-04T09:30:00Z``; fractions of a second only where there are any."""
    text = format_utc(instant)
    return text.replace(".000000Z", "Z")


# -- log --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogEntry:
    position: int  # @N: its place among the versions, oldest first
    name: str
    timestamp: str
    previous: str | None
    message: str | None
    current: bool
    attributes: dict[str, Any] = field(default_factory=dict)
    change: str | None = None  # with a path: A added, M modified, D deleted in this version


def log(location: Location, path: str | None = None, limit: int | None = None, since: str | None = None,
        until: str | None = None) -> list[LogEntry]:
    """Versions oldest first; with ``path``, only those in which that file
    changed (the rule of ``history/``); then the time range, then the last ``limit``."""
    start, stop = (_instant(t, flag) for t, flag in ((since, "--since"), (until, "--until")))
    with Opened(location) as o:
        o.require_versions()
        changes = _file_changes(o, path) if path else None
        out = []
        for info in o.real:
            if changes is not None and info.name not in changes:
                continue
            if (start and info.timestamp < start) or (stop and info.timestamp > stop):
                continue
            out.append(LogEntry(o.position[info.name], info.name, short_utc(info.timestamp), info.previous,
                                info.message, info.name == o.current, dict(info.attrs),
                                changes[info.name] if changes is not None else None))
    return out[-limit:] if limit else out


def _instant(text: str | None, flag: str) -> dt.datetime | None:
    if text is None:
        return None
    instant = parse_time(text[1:] if text.startswith("@") else text)
    if instant is None:
        raise UserError(f"{flag} {text!r}: not a time (like 2024-01-15, 2024-01-15T10:30 or 2024-01-15T10:30:00+02:00)")
    return instant


def _file_changes(o: Opened, path: str) -> dict[str, str]:
    """Version name -> A, M or D for each version in which the file at ``path`` changed."""
    history = o.backend.history(path)
    if not history.revisions:
        if history.children:
            raise UserError(f"{path}: a directory; log takes a file (what was below it: ls history/{path}/)")
        raise UserError(f"{path}: never a file in any version of {o.backend.description}")
    out, there = {}, False
    for revision in history.revisions:
        out[revision.version] = "D" if revision.file is None else "M" if there else "A"
        there = revision.file is not None
    return out


# -- show -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shown:
    selector: str
    name: str
    position: int | None  # None: a placeholder (never a selector's answer)
    of: int  # how many versions there are
    timestamp: str
    previous: str | None
    message: str | None
    current: bool
    attributes: dict[str, Any]
    path: str | None = None
    entry: str | None = None  # history/<path>/<entry>, the file as this version has it
    changed_in: str | None = None  # the version that last changed it, up to this one
    deleted: bool = False  # it was deleted in changed_in (and is not in this version)
    size: int | None = None


def show(location: Location, selector: str, path: str | None = None) -> Shown:
    """Which version a selector picks; with ``path``, that file's entry in history/."""
    with Opened(location) as o:
        info = o.select(selector)
        shown = Shown(selector, info.name, o.position.get(info.name), len(o.real), short_utc(info.timestamp),
                      info.previous, info.message, info.name == o.current, dict(info.attrs))
        if not path:
            return shown
        listing = history_listing(o.backend.history(path))
        if not listing.history.revisions:
            raise UserError(f"{path}: never a file in any version of {o.backend.description}")
        order = {v.name: i for i, v in enumerate(o.versions)}
        upto = [(name, rev, entry) for name, (rev, entry) in listing.entries.items() if order.get(rev.version, -1) <= order[info.name]]
        if not upto:
            raise UserError(f"{path}: not there yet in version {info.name} (first in {listing.history.revisions[0].version})")
        name, revision, entry = upto[-1]
        prefix = os.path.join(location.mountpoint, "") if location.mountpoint else ""
        size = entry.size if entry.size is not None or revision.file is None else o.backend.file_size(entry.ref)
        return Shown(**{**asdict(shown), "path": path, "entry": f"{prefix}history/{path}/{name}",
                        "changed_in": revision.version, "deleted": revision.file is None, "size": size})


# -- diff -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    status: str  # A added, D removed, M modified
    path: str  # an empty directory ends in '/'
    delta: FileDelta | None = None  # M: what the store tells of it


@dataclass(frozen=True)
class Diff:
    old: str
    new: str
    differences: list[Difference]


def diff(location: Location, old: str, new: str, paths: list[str]) -> Diff:
    """What was added, removed and changed from version ``old`` to ``new``
    (below ``paths``, if given), from the format's metadata: no data is read."""
    with Opened(location) as o:
        a, b = o.select(old), o.select(new)
        tree_a, tree_b = o.backend.tree(a.name), o.backend.tree(b.name)
        out: list[Difference] = []
        for path in paths or [""]:
            path = path.strip("/")
            entry_a, entry_b = find(tree_a, path), find(tree_b, path)
            if path and entry_a is None and entry_b is None:
                raise UserError(f"{path}: in neither {a.name} nor {b.name}")
            out += _compare(o.backend, path, entry_a, entry_b)
    return Diff(a.name, b.name, out)


def _compare(backend: Backend, path: str, a: Dir | File | None, b: Dir | File | None) -> Iterator[Difference]:
    if isinstance(a, Dir) or isinstance(b, Dir):
        if a is not None and not isinstance(a, Dir):
            yield Difference("D", path)  # a file became a directory
        if b is not None and not isinstance(b, Dir):
            yield Difference("A", path)
        da, db = (e if isinstance(e, Dir) else Dir(0) for e in (a, b))
        if not da.children and not db.children and path and (a is None or b is None):
            yield Difference("A" if a is None else "D", path + "/")  # an empty directory
        for name in sorted(da.children.keys() | db.children.keys()):
            if not path and name in backend.generated_names:
                continue  # HDF5's .version.json: names the version, so it always differs
            yield from _compare(backend, join(path, name), da.children.get(name), db.children.get(name))
    elif a is None or b is None:
        if a is not None or b is not None:
            yield Difference("A" if a is None else "D", path)
    else:
        delta = _file_delta(backend, a, b)
        if not delta.same:
            yield Difference("M", path, delta)


def _file_delta(backend: Backend, a: File, b: File) -> FileDelta:
    if a.content is not None or b.content is not None:  # generated (.attrs.json): its bytes are at hand
        old, new = a.content or b"", b.content or b""
        return FileDelta(old == new, len(old), len(new))
    return backend.file_delta(a, b)


# -- init, compact ----------------------------------------------------------------------
def init(source: str, endpoint_url: str | None = None) -> str:
    """Create an empty versioned HDF5 file (refusing an existing one), or enable
    versioning on a bucket."""
    return create_source(source, endpoint_url)


@dataclass(frozen=True)
class Removal:
    key: str  # where the store keeps it (s3://bucket/key)
    version_id: str
    modified: str
    same_as: str  # the version id it repeats
    removed: bool  # False: --dry-run


def compact(source: str, dry_run: bool, endpoint_url: str | None = None) -> list[Removal]:
    """Remove consecutive duplicate versions of each file, where the source keeps
    them (S3: of each key; the backend's ``no_compaction`` says why not)."""
    refusal = backend_class(source).no_compaction
    if refusal is not None:
        raise SourceError(f"{source}: {refusal}")
    backend = open_backend(source, endpoint_url)
    try:
        backend.versions()
        out = []
        for duplicate in backend.duplicates():
            if not dry_run:
                backend.remove_duplicate(duplicate)
            out.append(Removal(duplicate.name, duplicate.version_id, short_utc(duplicate.modified),
                               duplicate.same_as, not dry_run))
        return out
    finally:
        backend.close()
