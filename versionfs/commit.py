"""Turning staging into the next version: what changed, conflicts, the commit.

Backend-agnostic: the staged rows and the base tree give the candidate changes
without reading data; contents are compared only where a file was rewritten
(skip-if-unchanged); conflicts are checked against the latest version when
staging's base is no longer the latest; the backend writes the version.

Crash safety of staging around a commit: the new version's name is recorded
before the backend commits and staging is emptied in one transaction after; a
daemon that dies in between finds the record at start (``finish_interrupted``)
and empties staging only if the version exists.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, replace

import trio

from .backends.base import Change, Dir, File, FileMeta, Progress, find, join
from .errors import CommitRefused, Conflict
from .namespace import Namespace
from .selectors import choose
from .spool import Row
from .staging import FILE_MODE, Overlay, copy_into

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatusLine:
    code: str  # A, M or D
    path: str

    def __str__(self) -> str:
        return f"{self.code} {self.path}"


# -- what changed -----------------------------------------------------------------
def candidate_changes(base: Dir, store, generated: frozenset[str] = frozenset()) -> list[Change]:
    """Changes the staged rows describe, without reading any data. ``generated``:
    the backend's generated root names (a staged file of that name is never stored)."""
    rows = store.rows
    changes: list[Change] = []
    for path in sorted(rows):
        if path in generated:
            continue
        row = rows[path]
        entry = find(base, path)
        if row.kind == "deleted":
            if entry is not None:
                changes.append(Change(path, "delete"))
        elif row.kind == "dir":
            if isinstance(entry, File):
                changes.append(Change(path, "delete"))
            if not isinstance(entry, Dir) and path:
                changes.append(Change(path, "dir"))
            if row.opaque and isinstance(entry, Dir):
                for name in entry.children:
                    if join(path, name) not in rows:
                        changes.append(Change(join(path, name), "delete"))
        elif row.kind == "link":
            if isinstance(entry, Dir):
                changes.append(Change(path, "delete"))
            changes.append(Change(path, "link", target=row.target, **_kept(row)))
        elif row.kind == "file":
            if isinstance(entry, Dir):
                changes.append(Change(path, "delete"))
            if row.blob is not None:
                written = tuple(store.written(row.blob)) if row.tracked and row.origin == path else None
                changes.append(Change(path, "file", local=store.blob_path(row.blob), written=written, **_kept(row)))
            elif row.base_path is not None and (row.base_path != path or isinstance(entry, File)):
                # A rename, or (same path) a metadata change: real_changes keeps it if the mode changed.
                changes.append(Change(path, "file", base_path=row.base_path, **_kept(row)))
    return changes


def _kept(row: Row) -> dict:
    """The metadata a version keeps of a staged entry (doc/SEMANTICS.md § What a version keeps)."""
    return {"mode": row.mode, "mtime_ns": row.mtime_ns, "uid": row.uid, "gid": row.gid}


def real_changes(backend, changes: list[Change], base: Dir) -> list[Change]:
    """Drop rewrites with identical content (blocking: reads data)."""
    out = []
    for change in changes:
        entry = find(base, change.path)
        if change.kind == "file" and change.local is not None and isinstance(entry, File):
            if same_mode(backend, entry, change) and backend.same_content(entry, change.local, change.written):
                continue
        if change.kind == "file" and change.base_path == change.path and isinstance(entry, File):
            if same_mode(backend, entry, change) or file_meta(backend, entry).link:
                continue  # owner or times alone (a link's mode is always 0777): nothing a version keeps changed
        if change.kind == "link" and isinstance(entry, File) and same_link(backend, entry, change.target):
            continue
        out.append(change)
    return out


def file_meta(backend, entry: File) -> FileMeta:
    return entry.meta if entry.meta is not None else backend.file_meta(entry.ref)


def same_mode(backend, entry: File, change: Change) -> bool:
    """Whether a staged file keeps the mode bits its base version shows in staging."""
    meta = file_meta(backend, entry)
    if meta.link:
        return False
    base_mode = meta.mode if meta.mode is not None else FILE_MODE
    return change.mode is None or change.mode == base_mode


def same_link(backend, entry: File, target: str | None) -> bool:
    meta = file_meta(backend, entry)
    if not meta.link or target is None:
        return False
    data = entry.content if entry.content is not None else bytes(backend.read(entry.ref, 0, entry.size or 0))
    return data == os.fsencode(target)


def rebase(backend, changes: list[Change], base: Dir, latest: Dir) -> tuple[list[Change], list[str]]:
    """Changes to apply on top of latest, and the paths that conflict: changed in
    staging and also between base and latest, to something else (blocking)."""
    kept, clashes = [], []
    for change in changes:
        before, now = find(base, change.path), find(latest, change.path)
        if same_entry(backend, before, now):
            kept.append(change)
        elif not already_in(backend, change, now):
            clashes.append(change.path)
    return kept, clashes


def already_in(backend, change: Change, entry) -> bool:
    """Whether latest already shows what this change would make (both sides agree)."""
    if change.kind == "delete":
        return entry is None
    if change.kind == "dir":
        return isinstance(entry, Dir)
    return isinstance(entry, File) and change.local is not None and backend.same_content(entry, change.local, None)


def same_entry(backend, a, b) -> bool:
    if a is None or b is None or isinstance(a, Dir) or isinstance(b, Dir):
        return type(a) is type(b)
    if a.content is not None or b.content is not None:
        return a.content == b.content
    return backend.fingerprint(a.ref) == backend.fingerprint(b.ref)


def status_lines(changes: list[Change], base: Dir) -> list[StatusLine]:
    lines = []
    for change in changes:
        exists = find(base, change.path) is not None
        if change.kind == "delete":
            entry = find(base, change.path)
            lines.append(StatusLine("D", change.path + ("/" if isinstance(entry, Dir) else "")))
        elif change.kind == "dir":
            lines.append(StatusLine("A", change.path + "/"))
        else:
            lines.append(StatusLine("M" if exists else "A", change.path))
    return lines


# -- names ------------------------------------------------------------------------
def check_version_name(name: str, taken: set[str]) -> None:
    if not name:
        raise CommitRefused("a version name cannot be empty")
    if "/" in name or "\0" in name:
        raise CommitRefused(f"invalid version name {name!r}: no '/' or NUL")
    if name.startswith(("@", ".")):
        raise CommitRefused(f"invalid version name {name!r}: it cannot start with '@' or '.'")
    if len(name.encode()) > 255:
        raise CommitRefused("invalid version name: longer than 255 bytes")
    if name in taken:
        raise CommitRefused(f"a version named {name!r} already exists")


def default_version_name(taken: set[str], now: dt.datetime | None = None) -> str:
    """``2024-01-15T103000Z`` (ISO 8601's basic time: no ``:``, so the name needs
    no escaping in a file name or a history/ entry), with ``-2``, ``-3``… if that
    second is taken."""
    base = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H%M%SZ")
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


# -- the operations the control channel offers -------------------------------------------
class Committer:
    """commit, status, discard and rollback for one mount."""

    def __init__(self, ns: Namespace, overlay: Overlay):
        self.ns, self.overlay = ns, overlay

    async def _changes(self, rebasing: bool = False) -> tuple[list[Change], Dir]:
        base = await self.overlay.base_tree()
        store = self.overlay.store
        candidates = candidate_changes(base, store, self.overlay.generated)
        await self._fill_sparse(base, rebasing)
        return await self.ns.worker.run(real_changes, self.ns.backend, candidates, base), base

    async def _fill_sparse(self, base: Dir, everything: bool) -> None:
        """Fill the holes of sparse copy-ups whose change the backend will read
        whole (an upload, a full comparison, a rename): only an in-place edit that
        left the header alone, on a backend that edits in place, reads just the
        units it wrote, which a sparse blob holds. ``everything``: all of them
        (a rebase compares whole files with the latest version)."""
        store = self.overlay.store
        for row in [r for r in store.rows.values() if r.fill_limit is not None and r.blob is not None]:
            if not everything and self.ns.backend.edits_in_place and row.tracked and row.origin == row.path:
                entry = find(base, row.path)
                header = entry.layout.start if isinstance(entry, File) else 0
                if all(start >= header for start, _ in store.written(row.blob)):
                    continue
            await self.overlay.fill(row)

    async def status(self) -> list[str]:
        async with self.overlay.lock:
            changes, base = await self._changes()
        return [str(line) for line in status_lines(changes, base)]

    async def discard(self) -> None:
        async with self.overlay.lock:
            self._refuse_open_writers()
            info = self.ns.current_info()
            await self.overlay.reset(info.name if info else None)
        self.ns.notify_changed()

    def _refuse_open_writers(self) -> None:
        if self.overlay.writers:
            raise CommitRefused(f"{self.overlay.writers} file(s) in staging/ are open for writing; close them first")

    async def commit(self, name: str | None = None, message: str | None = None, progress: Progress | None = None) -> str | None:
        """The new version's name, or None when staging equals the latest version."""
        try:
            async with self.overlay.lock:
                name = await self._commit_locked(name, message, progress)
        finally:
            self.ns.notify_changed()  # a failed commit to a store without transactions (S3) may have written some
        return name

    async def _commit_locked(self, name: str | None, message: str | None, progress: Progress | None = None) -> str | None:
        self._refuse_open_writers()
        if not self.overlay.changed:
            return None  # nothing written: answered without reading any data
        await self.ns.reload()
        latest = self.ns.current_info()
        latest_name = latest.name if latest else None
        await self.overlay.base_tree()  # staging's base, as recorded (or latest, if it has none)
        base_name = self.overlay.base_version
        changes, base = await self._changes(rebasing=base_name != latest_name)
        if not changes:
            await self.overlay.reset(latest_name)
            return None
        latest_tree = await self.ns.tree(latest_name) if latest_name else Dir(0)
        if base_name != latest_name:
            changes, clashes = await self.ns.worker.run(rebase, self.ns.backend, changes, base, latest_tree)
            if clashes:
                raise Conflict(str(base_name), str(latest_name), clashes)
            if not changes:
                await self.overlay.reset(latest_name)
                return None
        taken = set(self.ns.by_name)
        if self.ns.backend.names_versions:
            name = name if name is not None else default_version_name(taken)
            check_version_name(name, taken)
        elif name is not None:
            raise CommitRefused(f"{self.ns.backend.description}: versions are named by the time of the change; -n cannot name one")
        store = self.overlay.store
        store.set_meta("committing", name or "")  # "": the name is known only afterwards
        await trio.to_thread.run_sync(store.sync)
        try:
            name = await self.ns.worker.run(self.ns.backend.commit, latest_name, changes, name, message, latest_tree, progress)
        except BaseException:
            store.set_meta("committing", None)
            with trio.CancelScope(shield=True):
                try:
                    await self.ns.reload()  # show what the store holds now
                except Exception as e:  # noqa: BLE001 - the commit's own error is the one to report
                    log.warning("after a failed commit, the versions could not be listed again: %s", e)
            raise
        await self.ns.reload()
        await self.overlay.reset(name)  # also clears the "committing" record, atomically
        await trio.to_thread.run_sync(store.sync)
        log.info("committed version %s (%d changes)", name, len(changes))
        return name

    async def rollback(self, selector: str, name: str | None = None, message: str | None = None,
                       progress: Progress | None = None) -> str | None:
        """Commit the content of the selected version as a new version (history is
        never rewritten). Returns the new version's name, or None if unchanged."""
        info = choose(selector, self.ns.index, self.ns.by_name)
        if info is None:
            raise CommitRefused(f"no version matches {selector!r}")
        async with self.overlay.lock:
            if self.overlay.changed:
                raise CommitRefused("staging has changes; commit or discard them first")
            target = await self.ns.tree(info.name)
            latest = self.ns.current_info()
            current = await self.ns.tree(latest.name) if latest else Dir(0)
            differences = await self.ns.worker.run(tree_difference, self.ns.backend, current, target, self.overlay.generated)
            await self._stage(differences)
            name = await self._commit_locked(name, message or f"rollback to {info.name}", progress)
        self.ns.notify_changed()
        return name

    async def _stage(self, differences: list[tuple[str, str, File | None]]) -> None:
        """Put the target version's side of each difference into staging: the
        contents first (copied off the trio loop), then every row in one transaction."""
        overlay, store = self.overlay, self.overlay.store
        rows: list[Row] = []
        blobs: list[str] = []
        try:
            for kind, path, entry in differences:
                if kind == "delete":
                    rows.append(Row(path, "deleted"))
                    continue
                meta = overlay.meta_row(None, entry if entry is not None else Dir(self.ns.newest_mtime_ns()), path)
                if kind == "dir":
                    rows.append(replace(meta, kind="dir", opaque=True))
                elif (await self.ns.file_meta(entry)).link:
                    rows.append(replace(meta, kind="link", base_path=None, target=await self.ns.link_target(entry)))
                else:
                    blob = store.new_blob()
                    blobs.append(blob)
                    await copy_into(overlay, entry, store.blob_path(blob))
                    rows.append(replace(meta, kind="file", base_path=None, blob=blob))
            with store.transaction():
                store.put_many(rows)
        except BaseException:
            for blob in blobs:
                store.drop_blob(blob)
            raise
        overlay.touch()


def tree_difference(backend, current: Dir, target: Dir, generated: frozenset[str] = frozenset(),
                    prefix: str = "") -> list[tuple[str, str, File | None]]:
    """What makes ``current`` show what ``target`` shows: (kind, path, target entry).
    Files with the same fingerprint are left alone; the backend's generated root
    names are not staged (blocking)."""
    out: list[tuple[str, str, File | None]] = []
    for name, entry in current.children.items():
        if name not in target.children or type(target.children[name]) is not type(entry):
            out.append(("delete", join(prefix, name), None))
    for name, entry in target.children.items():
        path = join(prefix, name)
        mine = current.children.get(name)
        if isinstance(entry, Dir):
            if not isinstance(mine, Dir):
                out.append(("dir", path, None))
            out += tree_difference(backend, mine if isinstance(mine, Dir) else Dir(0), entry, generated, path)
        elif (name not in generated or prefix) and not same_entry(backend, mine, entry):
            out.append(("file", path, entry))
    return out


def finish_interrupted(overlay: Overlay, versions: set[str]) -> None:
    """At start: settle a commit the daemon died in (see the module docstring)."""
    name = overlay.store.meta("committing")
    if name is None:
        return
    if name == "":
        # A store that names versions itself (S3): what was written is now in the
        # latest version, so the next commit finds those paths already there.
        log.warning("a commit was interrupted: staging is kept; the next commit writes what is missing")
        overlay.store.set_meta("committing", None)
    elif name in versions:
        log.warning("the commit of %s completed before the daemon stopped: staging is now empty", name)
        overlay.reset_rows(name)
        overlay.store.tidy()
    else:
        log.warning("the commit of %s did not complete: staging is kept", name)
        overlay.store.set_meta("committing", None)

