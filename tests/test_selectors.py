import datetime as dt

import pytest

from versionfs.selectors import AsOf, ById, Position, VersionIndex, parse

UTC = dt.timezone.utc


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2024-01-15", dt.datetime(2024, 1, 15, tzinfo=UTC)),
        ("2024-01-15T10:30", dt.datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
        ("2024-01-15T10:30:00.123456Z", dt.datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)),
        ("2024-01-15T10:30:00+02:00", dt.datetime(2024, 1, 15, 8, 30, tzinfo=UTC)),
        ("2024-01-15T10:30:00-05:30", dt.datetime(2024, 1, 15, 16, 0, tzinfo=UTC)),
        ("2024-01-15 10:30:00", dt.datetime(2024, 1, 15, 10, 30, tzinfo=UTC)),
        ("2024-01-15T10:30:00.5", dt.datetime(2024, 1, 15, 10, 30, 0, 500000, tzinfo=UTC)),
        # nanoseconds are truncated: exact for as-of, as stored times are in µs
        ("2024-01-15T10:30:00.123456999Z", dt.datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)),
    ],
)
def test_time_forms(text, expected):
    assert parse(text) == AsOf(expected)


# A bare number is always a position, even one that looks like a year.
@pytest.mark.parametrize("text, index", [("-1", -1), ("-2", -2), ("0", 0), ("1", 1), ("17", 17), ("2024", 2024)])
def test_positions(text, index):
    assert parse(text) == Position(index)


@pytest.mark.parametrize(
    "text",
    ["", "latest", "-", "--1", "+1", "1.5", "2024-1-5", "2024-13-01", "2024-02-30",
     "2024-01-15T25:00", "2024-01-15T10", "2024-01-15Z", "2024-W03",
     "2024-01-15T10:30:00.1234567890", "2024-01-15T10:30+0200", " 2024-01-15", "2024-01-15 ",
     "id:", "1e3", "0x10", "١٢"],
)
def test_anything_else_is_not_a_selector(text):
    assert parse(text) is None


def test_index_as_of_and_positions():
    t = [dt.datetime(2024, 1, d, tzinfo=UTC) for d in (1, 2, 2, 5)]
    index = VersionIndex(["a", "b", "c", "d"], t)
    assert index.resolve(AsOf(dt.datetime(2023, 12, 31, tzinfo=UTC))) is None
    assert index.resolve(AsOf(t[0])) == "a"
    assert index.resolve(AsOf(t[0] + dt.timedelta(microseconds=1))) == "a"
    assert index.resolve(AsOf(t[1])) == "c"  # ties: the newest in listing order
    assert index.resolve(AsOf(t[3] - dt.timedelta(microseconds=1))) == "c"
    assert index.resolve(AsOf(dt.datetime(2030, 1, 1, tzinfo=UTC))) == "d"
    assert [index.resolve(Position(i)) for i in (0, 3, -1, -4)] == ["a", "d", "d", "a"]
    assert index.resolve(Position(4)) is None and index.resolve(Position(-5)) is None


def test_relative_selectors():
    assert Position(-1).is_relative() and not Position(0).is_relative()
    assert AsOf(dt.datetime(3000, 1, 1, tzinfo=UTC)).is_relative()
    assert not AsOf(dt.datetime(2000, 1, 1, tzinfo=UTC)).is_relative()


def test_ids():
    assert parse("id:v2") == ById("v2")
    assert parse("id:3/L4kqtJl+cp.X_-null") == ById("3/L4kqtJl+cp.X_-null")  # S3 VersionIds as they come
    t = [dt.datetime(2024, 1, d, tzinfo=UTC) for d in (1, 2)]
    index = VersionIndex(["a", "b"], t, ["id-a", "id-b"])
    assert index.resolve(ById("id-b")) == "b" and index.resolve(ById("nope")) is None
    assert VersionIndex(["a"], t[:1]).resolve(ById("a")) is None  # no ids given: nothing by id
    assert not ById("x").is_relative()


def test_times_whose_offset_leaves_the_calendar():
    """Year 1 at +01:00 is before any UTC instant Python has; year 9999 at -01:00
    after: before and after every version, never an OverflowError (the mount's EIO)."""
    t = [dt.datetime(2024, 1, d, tzinfo=UTC) for d in (1, 2)]
    index = VersionIndex(["a", "b"], t)
    early, late = parse("0001-01-01T00:30+01:00"), parse("9999-12-31T23:30-01:00")
    assert isinstance(early, AsOf) and index.resolve(early) is None
    assert isinstance(late, AsOf) and index.resolve(late) == "b"


def test_choose_names_first_then_selectors():
    from versionfs.selectors import choose

    t = [dt.datetime(2024, 1, d, tzinfo=UTC) for d in (1, 2, 3)]
    index = VersionIndex(["v1", "-1", "v3"], t)
    names = {"v1": "v1", "-1": "-1", "v3": "v3"}
    assert choose("-1", index, names) == "-1"  # a real name wins
    assert choose("@-1", index, names) == "v3"
    assert choose("@2024-01-02", index, names) == choose("2024-01-02", index, names) == "-1"
    assert choose("@2099-01-01", index, names) == "v3"  # the future: the latest
    assert choose("nope", index, names) is None and choose("@0001-01-01T00:30+01:00", index, names) is None
