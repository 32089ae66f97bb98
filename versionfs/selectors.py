"""The selector grammar: ``@<time>``, ``@<position>`` and ``@id:<id>`` (doc/SEMANTICS.md § Selectors).

One grammar serves the root, ``history/`` and the CLI. A selector names an
instant (the version current *as of* then), a position in the oldest-first list,
or an id (an S3 VersionId in ``history/``; a version's name elsewhere).
Anything that is not exactly one of the documented forms is rejected: no guessing.
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
from dataclasses import dataclass
from typing import Generic, Mapping, Sequence, TypeVar, Union

UTC = dt.timezone.utc

# Dates with optional time (T or space), fraction up to nanoseconds, and offset
# (Z or +HH:MM) only after a time. datetime.fromisoformat then checks the ranges.
_TIME_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?(?:Z|[+-][0-9]{2}:[0-9]{2})?)?"
)
_POSITION_RE = re.compile(r"-?[0-9]{1,9}")


@dataclass(frozen=True)
class AsOf:
    """The newest version whose timestamp is <= ``instant`` (aware, UTC)."""

    instant: dt.datetime

    def is_relative(self, now: dt.datetime | None = None) -> bool:
        # A time still in the future names a different version once one is added.
        return self.instant > (now or dt.datetime.now(UTC))


@dataclass(frozen=True)
class Position:
    """``@0`` the first version, ``@-1`` the latest."""

    index: int

    def is_relative(self, now: dt.datetime | None = None) -> bool:
        return self.index < 0


@dataclass(frozen=True)
class ById:
    """``@id:<id>``: the entry with exactly that id."""

    id: str

    def is_relative(self, now: dt.datetime | None = None) -> bool:
        return False


Selector = Union[AsOf, Position, ById]


def parse_time(text: str) -> dt.datetime | None:
    """Parse an instant in one of the documented forms; no offset means UTC."""
    if not _TIME_RE.fullmatch(text):
        return None
    # fromisoformat keeps microseconds; truncating nanoseconds is exact for as-of
    # lookups because stored timestamps have microsecond resolution.
    main, dot, frac = text.partition(".")
    if dot:
        digits = re.match(r"[0-9]+", frac).group(0)
        text = f"{main}.{digits[:6].ljust(6, '0')}{frac[len(digits):]}"
    try:
        instant = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    try:
        return instant.astimezone(UTC)
    except OverflowError:  # within an offset of year 1 or 9999: before or after any version
        return (dt.datetime.min if instant.year == 1 else dt.datetime.max).replace(tzinfo=UTC)


def parse(text: str) -> Selector | None:
    """Parse a selector without its leading ``@``; None if it is not one."""
    if text.startswith("id:") and len(text) > 3:
        return ById(text[3:])
    if _POSITION_RE.fullmatch(text):
        return Position(int(text))
    instant = parse_time(text)
    return AsOf(instant) if instant is not None else None


T = TypeVar("T")


class VersionIndex(Generic[T]):
    """Versions sorted oldest first with their timestamps: O(log n) as-of lookups.

    ``items`` must already be in the listing order; ties in timestamp resolve to
    the last of the tied versions (the newest in the listing). ``ids`` (one per
    item) answer ``@id:``.
    """

    def __init__(self, items: Sequence[T], timestamps: Sequence[dt.datetime], ids: Sequence[str] = ()):
        self.items = list(items)
        self._timestamps = list(timestamps)
        self._ids = {id_: item for id_, item in zip(ids, self.items)}
        if self._timestamps != sorted(self._timestamps):
            raise ValueError("versions must be sorted by timestamp")

    def __len__(self) -> int:
        return len(self.items)

    def resolve(self, selector: Selector) -> T | None:
        if isinstance(selector, ById):
            return self._ids.get(selector.id)
        if isinstance(selector, Position):
            i = selector.index
            if -len(self.items) <= i < len(self.items):
                return self.items[i]
            return None
        i = bisect.bisect_right(self._timestamps, selector.instant)
        return self.items[i - 1] if i else None


def choose(text: str, index: VersionIndex[T], by_name: Mapping[str, T]) -> T | None:
    """What the CLI's SELECTOR arguments mean: a version by its exact name first
    (a real name always wins, as in ``history/``), else a selector, with or
    without its ``@`` (``@-2``, ``2024-01-15``); None if neither matches."""
    if text in by_name:
        return by_name[text]
    selector = parse(text[1:] if text.startswith("@") else text)
    return index.resolve(selector) if selector is not None else None


def format_utc(instant: dt.datetime) -> str:
    """``2024-01-15T10:30:00.123456Z``: the form versionfs prints timestamps in."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
