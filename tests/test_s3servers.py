"""The S3 behaviours versionfs relies on, checked against moto and ministack.

Every test runs against both servers (see tests/s3servers.py). Where a server is
known to get a behaviour wrong (compared with AWS S3's documented behaviour), that
server's case is marked ``xfail(strict=True, raises=AssertionError)``: the file
passes, documents the difference, and turns red the day the server is fixed (or
breaks differently). /tmp/s3-notes.md summarises the table.

All behaviour checks are plain ``assert``s, so an xfail can only be "satisfied" by
the behaviour being wrong, never by an unrelated crash (a crash is not an
AssertionError and fails the test).
"""

from __future__ import annotations

import base64
import os
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.exceptions import ClientError  # noqa: E402

from s3servers import (  # noqa: E402,F401  (the two fixtures are registered by importing them)
    KINDS,
    make_bucket,
    make_client,
    make_versioned_bucket,
    ministack_endpoint,
    moto_endpoint,
)


# -- parametrization -------------------------------------------------------------------
def servers(**wrong: str):
    """Both server kinds; ``kind="why"`` marks that server's case as a strict xfail."""
    params = []
    for kind in KINDS:
        marks = ()
        if kind in wrong:
            marks = pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"{kind} is wrong: {wrong[kind]}")
        params.append(pytest.param(kind, marks=marks, id=kind))
    return params


@pytest.fixture(scope="session")
def _s3_clients():
    return {}


@pytest.fixture
def s3(request, _s3_clients):
    """A boto3 client (one per server for the session) for the server named by the
    (indirect) parameter; each test makes its own bucket."""
    kind = request.param
    if kind not in _s3_clients:
        try:
            endpoint = request.getfixturevalue(f"{kind}_endpoint")
        except ModuleNotFoundError as e:  # server package not installed
            pytest.skip(f"{kind} not installed: {e}")
        _s3_clients[kind] = make_client(endpoint)
    return _s3_clients[kind]


def md5_etag(data: bytes) -> str:
    return '"%s"' % hashlib.md5(data).hexdigest()


def multipart_etag(parts: list[bytes]) -> str:
    return '"%s-%d"' % (hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest(), len(parts))


def b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@dataclass
class Err:
    status: int
    code: str
    headers: dict


def expect_error(fn, **kw) -> Err:
    try:
        fn(**kw)
    except ClientError as e:
        meta = e.response.get("ResponseMetadata", {})
        return Err(meta.get("HTTPStatusCode"), e.response.get("Error", {}).get("Code"), meta.get("HTTPHeaders", {}))
    raise AssertionError(f"{fn.__name__}({kw}) succeeded; an error was expected")


@dataclass
class Entry:
    """One <Version> or <DeleteMarker> of a ListObjectVersions response, in XML order."""

    kind: str  # "Version" | "DeleteMarker"
    key: str
    version_id: str
    is_latest: bool
    last_modified: str
    etag: str | None
    size: int | None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def raw_list_versions(client, **kw) -> tuple[list[Entry], dict]:
    """One ListObjectVersions page, entries in the server's own order.

    boto3 splits <Version> and <DeleteMarker> into two lists, which loses the
    interleaving that says which came first; so the raw XML body is parsed here.
    """
    bodies: list[bytes] = []

    def grab(response_dict, **_):
        bodies.append(response_dict["body"])

    client.meta.events.register("before-parse.s3.ListObjectVersions", grab)
    try:
        parsed = client.list_object_versions(**kw)
    finally:
        client.meta.events.unregister("before-parse.s3.ListObjectVersions", grab)
    root = ET.fromstring(bodies[-1])
    entries = []
    for el in root:
        tag = _local(el.tag)
        if tag not in ("Version", "DeleteMarker"):
            continue
        f = {_local(c.tag): (c.text or "") for c in el}
        entries.append(
            Entry(
                kind=tag,
                key=f["Key"],
                version_id=f["VersionId"],
                is_latest=f["IsLatest"] == "true",
                last_modified=f["LastModified"],
                etag=f.get("ETag"),
                size=int(f["Size"]) if "Size" in f else None,
            )
        )
    return entries, parsed


def all_versions(client, page_size: int | None = None, **kw) -> tuple[list[Entry], list[dict]]:
    """Every entry, following KeyMarker + VersionIdMarker; also returns the page responses."""
    entries: list[Entry] = []
    pages: list[dict] = []
    extra: dict = {}
    while True:
        args = dict(kw, **extra)
        if page_size:
            args["MaxKeys"] = page_size
        page, parsed = raw_list_versions(client, **args)
        entries += page
        pages.append(parsed)
        assert len(pages) < 100, "pagination does not end"
        if not parsed.get("IsTruncated"):
            return entries, pages
        extra = {"KeyMarker": parsed["NextKeyMarker"]}
        if parsed.get("NextVersionIdMarker"):
            extra["VersionIdMarker"] = parsed["NextVersionIdMarker"]


# -- versioning basics -----------------------------------------------------------------
@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_versioning_enabled_and_put_returns_version_id(s3):
    bucket = make_versioned_bucket(s3)
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    r1 = s3.put_object(Bucket=bucket, Key="a.txt", Body=b"one")
    r2 = s3.put_object(Bucket=bucket, Key="a.txt", Body=b"two")
    assert r1["VersionId"] and r1["VersionId"] != "null"
    assert r2["VersionId"] and r2["VersionId"] not in ("null", r1["VersionId"])
    assert r1["ETag"] == md5_etag(b"one")


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_fresh_bucket_versioning_status_is_absent(s3):
    """A bucket that never had versioning: no Status (versionfs refuses it)."""
    bucket = make_bucket(s3)
    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket)


def _history(s3):
    """A bucket with key a.txt = [a1, a2, <delete marker>, a3] and b/c.txt = [b1, <delete marker>]."""
    bucket = make_versioned_bucket(s3)
    ids = {}
    ids["a1"] = s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a1")["VersionId"]
    ids["a2"] = s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a2 longer")["VersionId"]
    dm = s3.delete_object(Bucket=bucket, Key="a.txt")
    assert dm["DeleteMarker"] is True and dm["VersionId"] not in (None, "", "null")
    ids["dm"] = dm["VersionId"]
    ids["a3"] = s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a3")["VersionId"]
    ids["b1"] = s3.put_object(Bucket=bucket, Key="b/c.txt", Body=b"b1")["VersionId"]
    ids["bdm"] = s3.delete_object(Bucket=bucket, Key="b/c.txt")["VersionId"]
    return bucket, ids


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_list_versions_newest_first_with_delete_markers(s3):
    """The boto3-parsed view: Versions and DeleteMarkers, each newest first per key."""
    bucket, ids = _history(s3)
    parsed = s3.list_object_versions(Bucket=bucket)
    versions, markers = parsed["Versions"], parsed["DeleteMarkers"]
    assert [(v["Key"], v["VersionId"], v["IsLatest"]) for v in versions] == [
        ("a.txt", ids["a3"], True),
        ("a.txt", ids["a2"], False),
        ("a.txt", ids["a1"], False),
        ("b/c.txt", ids["b1"], False),
    ]
    assert [(d["Key"], d["VersionId"], d["IsLatest"]) for d in markers] == [
        ("a.txt", ids["dm"], False),
        ("b/c.txt", ids["bdm"], True),
    ]
    for v in versions + markers:
        assert {"Key", "VersionId", "IsLatest", "LastModified"} <= v.keys()
    by_id = {v["VersionId"]: v for v in versions}
    assert by_id[ids["a1"]]["ETag"] == md5_etag(b"a1") and by_id[ids["a1"]]["Size"] == 2
    assert by_id[ids["a2"]]["ETag"] == md5_etag(b"a2 longer") and by_id[ids["a2"]]["Size"] == 9
    # LastModified never increases along one key's entries (ties happen: see the notes).
    a_stamps = [v["LastModified"] for v in versions if v["Key"] == "a.txt"]
    assert a_stamps == sorted(a_stamps, reverse=True)
    assert by_id[ids["a2"]]["LastModified"] <= markers[0]["LastModified"] <= by_id[ids["a3"]]["LastModified"]


@pytest.mark.parametrize(
    "s3",
    servers(moto="each page lists every <Version> first, then every <DeleteMarker>, not one newest-first sequence"),
    indirect=True,
)
def test_list_versions_xml_interleaves_delete_markers(s3):
    """In the XML, a key's versions and delete markers form one newest-first sequence.

    boto3 splits them into two lists; with second-granularity LastModified the XML
    order is the only thing that says whether a delete marker came before or after a
    version written in the same second.
    """
    bucket, ids = _history(s3)
    entries, _ = all_versions(s3, Bucket=bucket)
    assert [(e.key, e.version_id, e.kind, e.is_latest) for e in entries] == [
        ("a.txt", ids["a3"], "Version", True),
        ("a.txt", ids["dm"], "DeleteMarker", False),
        ("a.txt", ids["a2"], "Version", False),
        ("a.txt", ids["a1"], "Version", False),
        ("b/c.txt", ids["bdm"], "DeleteMarker", True),
        ("b/c.txt", ids["b1"], "Version", False),
    ]
    assert next(e for e in entries if e.version_id == ids["dm"]).etag is None


@pytest.mark.parametrize(
    "s3", servers(ministack="with Delimiter and MaxKeys, pages hold only common prefixes (keys are lost) and repeat one"),
    indirect=True,
)
def test_list_versions_pagination_with_delimiter(s3):
    """One directory's listing (Delimiter "/"), page by page, holds every key's
    versions and every common prefix exactly once, as one page does."""
    bucket = make_versioned_bucket(s3)
    for k in range(3):
        s3.put_object(Bucket=bucket, Key=f"dir/k{k}", Body=b"1")
        s3.put_object(Bucket=bucket, Key=f"dir/sub{k}/x", Body=b"1")
    s3.put_object(Bucket=bucket, Key="dir/k1", Body=b"again")

    def listing(**extra) -> tuple[list[tuple[str, str]], list[str]]:
        kwargs = {"Bucket": bucket, "Prefix": "dir/", "Delimiter": "/", **extra}
        versions, prefixes = [], []
        while True:
            page = s3.list_object_versions(**kwargs)
            versions += [(v["Key"], v["VersionId"]) for v in page.get("Versions", [])]
            prefixes += [c["Prefix"] for c in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return sorted(versions), prefixes
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs.pop("VersionIdMarker", None)
            if page.get("NextVersionIdMarker"):
                kwargs["VersionIdMarker"] = page["NextVersionIdMarker"]

    whole = listing()
    assert len(whole[0]) == 4 and whole[1] == ["dir/sub0/", "dir/sub1/", "dir/sub2/"]
    assert listing(MaxKeys=2) == whole


@pytest.mark.parametrize("s3", servers(), indirect=True)
@pytest.mark.parametrize("page_size", [1, 2, 3])
def test_list_versions_pagination_inside_one_key(s3, page_size):
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="j", Body=b"j")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key="k", Body=b"k%d" % i)
    s3.delete_object(Bucket=bucket, Key="k")
    s3.put_object(Bucket=bucket, Key="k", Body=b"k-again")
    s3.put_object(Bucket=bucket, Key="l", Body=b"l1")
    s3.put_object(Bucket=bucket, Key="l", Body=b"l2")

    whole, _ = all_versions(s3, Bucket=bucket)
    assert len(whole) == 8
    paged, pages = all_versions(s3, page_size=page_size, Bucket=bucket)
    # Same entries, none twice, none lost. (Compared as sets: where delete markers sit
    # inside a page is test_list_versions_xml_interleaves_delete_markers's business.)
    assert len(paged) == len(whole)
    assert {(e.key, e.version_id) for e in paged} == {(e.key, e.version_id) for e in whole}
    # Versions (not markers) keep their newest-first order across page boundaries.
    assert [e.version_id for e in paged if e.kind == "Version"] == [e.version_id for e in whole if e.kind == "Version"]
    assert sum(e.is_latest for e in paged) == 3  # one per key
    assert all(len(p.get("Versions", [])) + len(p.get("DeleteMarkers", [])) <= page_size for p in pages)
    # At least one page boundary falls inside key "k"'s versions, resumed by VersionIdMarker.
    assert any(p.get("IsTruncated") and p.get("NextKeyMarker") == "k" and p.get("NextVersionIdMarker") for p in pages)


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_prefix_is_a_plain_string_prefix(s3):
    bucket = make_versioned_bucket(s3)
    for key in ("a.txt", "a.txt.bak", "a.txt/inner", "a.tx", "b.txt"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    entries, _ = all_versions(s3, Bucket=bucket, Prefix="a.txt")
    assert [e.key for e in entries] == ["a.txt", "a.txt.bak", "a.txt/inner"]


# -- reading versions ------------------------------------------------------------------
@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_get_and_head_specific_version(s3):
    bucket = make_versioned_bucket(s3)
    v1 = s3.put_object(Bucket=bucket, Key="f", Body=b"first", Metadata={"n": "1"})["VersionId"]
    v2 = s3.put_object(Bucket=bucket, Key="f", Body=b"second!", Metadata={"n": "2"})["VersionId"]
    s3.delete_object(Bucket=bucket, Key="f")  # old versions stay readable under a delete marker
    for vid, body, n in ((v1, b"first", "1"), (v2, b"second!", "2")):
        g = s3.get_object(Bucket=bucket, Key="f", VersionId=vid)
        assert g["Body"].read() == body
        assert g["VersionId"] == vid and g["ETag"] == md5_etag(body) and g["Metadata"] == {"n": n}
        h = s3.head_object(Bucket=bucket, Key="f", VersionId=vid)
        assert h["VersionId"] == vid and h["ContentLength"] == len(body) and h["ETag"] == md5_etag(body)
        assert h["Metadata"] == {"n": n} and h["LastModified"] == g["LastModified"]


@pytest.mark.parametrize("s3", servers(ministack="GetObject?versionId=… ignores Range: 200 with the whole body"), indirect=True)
def test_ranged_get_of_specific_version(s3):
    bucket = make_versioned_bucket(s3)
    v1 = s3.put_object(Bucket=bucket, Key="f", Body=b"0123456789")["VersionId"]
    s3.put_object(Bucket=bucket, Key="f", Body=b"abcdefghij")
    latest = s3.get_object(Bucket=bucket, Key="f", Range="bytes=2-4")
    assert latest["Body"].read() == b"cde"  # latest version: every server gets this right
    r = s3.get_object(Bucket=bucket, Key="f", VersionId=v1, Range="bytes=2-4")
    assert r["Body"].read() == b"234"
    assert r["ContentRange"] == "bytes 2-4/10" and r["ResponseMetadata"]["HTTPStatusCode"] == 206


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_get_of_unknown_version_id(s3):
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="f", Body=b"x")
    err = expect_error(s3.get_object, Bucket=bucket, Key="f", VersionId="3HL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY")
    assert err.status in (400, 404) and err.code in ("NoSuchVersion", "InvalidArgument")


def _deleted_key(s3):
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="gone", Body=b"x")
    dm = s3.delete_object(Bucket=bucket, Key="gone")["VersionId"]
    return bucket, dm


@pytest.mark.parametrize("s3", servers(moto="GetObject 404 lacks x-amz-delete-marker / x-amz-version-id"), indirect=True)
def test_get_when_latest_is_delete_marker(s3):
    bucket, dm = _deleted_key(s3)
    err = expect_error(s3.get_object, Bucket=bucket, Key="gone")
    assert (err.status, err.code) == (404, "NoSuchKey")
    assert err.headers.get("x-amz-delete-marker") == "true"
    assert err.headers.get("x-amz-version-id") == dm


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_head_when_latest_is_delete_marker(s3):
    bucket, dm = _deleted_key(s3)
    err = expect_error(s3.head_object, Bucket=bucket, Key="gone")
    assert err.status == 404
    assert err.headers.get("x-amz-delete-marker") == "true"
    assert err.headers.get("x-amz-version-id") == dm


@pytest.mark.parametrize("s3", servers(moto="GetObject?versionId=<delete marker> is 404 NoSuchVersion, not 405"), indirect=True)
def test_get_delete_marker_version_id_is_405(s3):
    bucket, dm = _deleted_key(s3)
    err = expect_error(s3.get_object, Bucket=bucket, Key="gone", VersionId=dm)
    assert (err.status, err.code) == (405, "MethodNotAllowed")
    assert err.headers.get("x-amz-delete-marker") == "true"


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_head_delete_marker_version_id_is_405(s3):
    bucket, dm = _deleted_key(s3)
    err = expect_error(s3.head_object, Bucket=bucket, Key="gone", VersionId=dm)
    assert err.status == 405
    assert err.headers.get("x-amz-delete-marker") == "true"


# -- the "null" version: before versioning, and Suspended ---------------------------------
@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_object_written_before_versioning_is_null_version(s3):
    bucket = make_bucket(s3)
    pre = s3.put_object(Bucket=bucket, Key="k", Body=b"pre")
    assert pre.get("VersionId") in (None, "null")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    entries, _ = all_versions(s3, Bucket=bucket)
    assert [(e.version_id, e.is_latest) for e in entries] == [("null", True)]
    post = s3.put_object(Bucket=bucket, Key="k", Body=b"post")["VersionId"]
    entries, _ = all_versions(s3, Bucket=bucket)
    assert [(e.version_id, e.is_latest, e.etag) for e in entries] == [
        (post, True, md5_etag(b"post")),
        ("null", False, md5_etag(b"pre")),
    ]
    assert s3.get_object(Bucket=bucket, Key="k", VersionId="null")["Body"].read() == b"pre"


@pytest.mark.parametrize("s3", servers(moto="HeadObject?versionId=null does not echo x-amz-version-id: null"), indirect=True)
def test_head_null_version_echoes_version_id(s3):
    bucket = make_bucket(s3)
    s3.put_object(Bucket=bucket, Key="k", Body=b"pre")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="k", Body=b"post")
    h = s3.head_object(Bucket=bucket, Key="k", VersionId="null")
    assert h["ETag"] == md5_etag(b"pre")
    assert h.get("VersionId") == "null"


@pytest.mark.parametrize(
    "s3",
    servers(moto="a PUT while Suspended deletes the Enabled-era versions of the key, not just the null version"),
    indirect=True,
)
def test_suspended_put_overwrites_only_the_null_version(s3):
    bucket = make_versioned_bucket(s3)
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"v1")["VersionId"]
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Suspended"
    s1 = s3.put_object(Bucket=bucket, Key="k", Body=b"s1")
    # AWS omits x-amz-version-id on a Suspended PUT (PutObject docs' sample); "null" is tolerated.
    assert s1.get("VersionId") in (None, "null")
    s3.put_object(Bucket=bucket, Key="k", Body=b"s2")
    entries, _ = all_versions(s3, Bucket=bucket)
    assert [(e.version_id, e.is_latest, e.etag) for e in entries] == [
        ("null", True, md5_etag(b"s2")),
        (v1, False, md5_etag(b"v1")),
    ]
    assert s3.get_object(Bucket=bucket, Key="k", VersionId=v1)["Body"].read() == b"v1"
    assert s3.get_object(Bucket=bucket, Key="k", VersionId="null")["Body"].read() == b"s2"
    # Enabled again: new PUTs get real ids, the null version stays.
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v3 = s3.put_object(Bucket=bucket, Key="k", Body=b"v3")["VersionId"]
    entries, _ = all_versions(s3, Bucket=bucket)
    assert [e.version_id for e in entries] == [v3, "null", v1]


@pytest.mark.parametrize(
    "s3", servers(moto="a DELETE while Suspended removes the object outright (no null delete marker)"), indirect=True
)
def test_suspended_delete_makes_null_delete_marker(s3):
    bucket = make_versioned_bucket(s3)
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"v1")["VersionId"]
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    s3.put_object(Bucket=bucket, Key="k", Body=b"s1")
    d = s3.delete_object(Bucket=bucket, Key="k")
    assert d.get("DeleteMarker") is True and d.get("VersionId") == "null"
    entries, _ = all_versions(s3, Bucket=bucket)
    assert [(e.kind, e.version_id, e.is_latest) for e in entries] == [
        ("DeleteMarker", "null", True),
        ("Version", v1, False),
    ]


# -- conditional writes ----------------------------------------------------------------
@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_if_none_match_star(s3):
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="new", Body=b"1", IfNoneMatch="*")  # absent: succeeds
    err = expect_error(s3.put_object, Bucket=bucket, Key="new", Body=b"2", IfNoneMatch="*")
    assert (err.status, err.code) == (412, "PreconditionFailed")
    assert s3.get_object(Bucket=bucket, Key="new")["Body"].read() == b"1"
    # Latest is a delete marker: the key does not exist, so the write goes through.
    s3.delete_object(Bucket=bucket, Key="new")
    s3.put_object(Bucket=bucket, Key="new", Body=b"3", IfNoneMatch="*")
    assert s3.get_object(Bucket=bucket, Key="new")["Body"].read() == b"3"


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_if_match_etag(s3):
    bucket = make_versioned_bucket(s3)
    e1 = s3.put_object(Bucket=bucket, Key="k", Body=b"1")["ETag"]
    e2 = s3.put_object(Bucket=bucket, Key="k", Body=b"2", IfMatch=e1)["ETag"]  # current: succeeds
    err = expect_error(s3.put_object, Bucket=bucket, Key="k", Body=b"3", IfMatch=e1)  # stale
    assert (err.status, err.code) == (412, "PreconditionFailed")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"2"
    # No current object (never existed, or hidden by a delete marker): 404 NoSuchKey.
    err = expect_error(s3.put_object, Bucket=bucket, Key="absent", Body=b"x", IfMatch=e2)
    assert (err.status, err.code) == (404, "NoSuchKey")
    s3.delete_object(Bucket=bucket, Key="k")
    err = expect_error(s3.put_object, Bucket=bucket, Key="k", Body=b"x", IfMatch=e2)
    assert (err.status, err.code) == (404, "NoSuchKey")


def _one_part_upload(s3, bucket, key, data):
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    part = s3.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=1, Body=data)
    return up, {"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]}


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_conditional_complete_multipart_if_none_match(s3):
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="k", Body=b"exists")
    up, parts = _one_part_upload(s3, bucket, "k", b"mp")
    err = expect_error(
        s3.complete_multipart_upload, Bucket=bucket, Key="k", UploadId=up, MultipartUpload=parts, IfNoneMatch="*"
    )
    assert (err.status, err.code) == (412, "PreconditionFailed")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"exists"


@pytest.mark.parametrize("s3", servers(moto="CompleteMultipartUpload ignores If-Match (a stale ETag overwrites)"), indirect=True)
def test_conditional_complete_multipart_if_match(s3):
    bucket = make_versioned_bucket(s3)
    old = s3.put_object(Bucket=bucket, Key="k", Body=b"old")["ETag"]
    s3.put_object(Bucket=bucket, Key="k", Body=b"current")
    up, parts = _one_part_upload(s3, bucket, "k", b"mp")
    err = expect_error(
        s3.complete_multipart_upload, Bucket=bucket, Key="k", UploadId=up, MultipartUpload=parts, IfMatch=old
    )
    assert (err.status, err.code) == (412, "PreconditionFailed")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"current"


# -- multipart ETags -------------------------------------------------------------------
@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_multipart_etag_is_md5_of_part_md5s(s3):
    bucket = make_versioned_bucket(s3)
    datas = [b"a" * (5 * 1024 * 1024), b"b" * (5 * 1024 * 1024 + 7), b"tail"]
    up = s3.create_multipart_upload(Bucket=bucket, Key="big", Metadata={"who": "mp"})["UploadId"]
    parts = []
    for n, data in enumerate(datas, 1):
        etag = s3.upload_part(Bucket=bucket, Key="big", UploadId=up, PartNumber=n, Body=data)["ETag"]
        assert etag == md5_etag(data)
        parts.append({"ETag": etag, "PartNumber": n})
    done = s3.complete_multipart_upload(Bucket=bucket, Key="big", UploadId=up, MultipartUpload={"Parts": parts})
    expected = multipart_etag(datas)
    assert done["ETag"] == expected and done["VersionId"] not in (None, "null")
    h = s3.head_object(Bucket=bucket, Key="big")
    assert h["ETag"] == expected and h["ContentLength"] == sum(map(len, datas)) and h["Metadata"] == {"who": "mp"}
    entries, _ = all_versions(s3, Bucket=bucket)
    assert entries[0].etag == expected
    r = s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={len(datas[0]) - 2}-{len(datas[0]) + 1}")
    assert r["Body"].read() == b"aabb"


# -- checksums and metadata ------------------------------------------------------------
@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_sha256_checksum_round_trip(s3):
    bucket = make_versioned_bucket(s3)
    body = b"hello checksum"
    s3.put_object(Bucket=bucket, Key="c", Body=body, ChecksumAlgorithm="SHA256")
    h = s3.head_object(Bucket=bucket, Key="c", ChecksumMode="ENABLED")
    assert h.get("ChecksumSHA256") == b64sha256(body)
    g = s3.get_object(Bucket=bucket, Key="c", ChecksumMode="ENABLED")
    assert g["Body"].read() == body
    assert g.get("ChecksumSHA256") == b64sha256(body)
    v = g["VersionId"]
    assert s3.head_object(Bucket=bucket, Key="c", VersionId=v, ChecksumMode="ENABLED").get("ChecksumSHA256") == b64sha256(body)


@pytest.mark.parametrize("s3", servers(ministack="PutObject response carries no x-amz-checksum-* header"), indirect=True)
def test_put_response_echoes_checksum(s3):
    bucket = make_versioned_bucket(s3)
    r = s3.put_object(Bucket=bucket, Key="c", Body=b"abc", ChecksumAlgorithm="SHA256")
    assert r.get("ChecksumSHA256") == b64sha256(b"abc")


@pytest.mark.parametrize("s3", servers(moto="a wrong x-amz-checksum-sha256 is accepted (and not stored)"), indirect=True)
def test_wrong_checksum_is_rejected(s3):
    bucket = make_versioned_bucket(s3)
    err = expect_error(s3.put_object, Bucket=bucket, Key="c", Body=b"abc", ChecksumSHA256=b64sha256(b"not abc"))
    assert err.status == 400 and err.code in ("BadDigest", "InvalidRequest", "XAmzContentChecksumMismatch")
    assert expect_error(s3.head_object, Bucket=bucket, Key="c").status == 404


@pytest.mark.parametrize("s3", servers(), indirect=True)
def test_user_metadata_round_trip(s3):
    bucket = make_versioned_bucket(s3)
    meta = {"Origin": "versionfs", "x-y_z": "a b=c", "empty": ""}
    v1 = s3.put_object(Bucket=bucket, Key="m", Body=b"1", Metadata=meta)["VersionId"]
    s3.put_object(Bucket=bucket, Key="m", Body=b"2", Metadata={"other": "2"})
    expected = {k.lower(): v for k, v in meta.items()}  # S3 lower-cases x-amz-meta-* names
    assert s3.head_object(Bucket=bucket, Key="m", VersionId=v1)["Metadata"] == expected
    assert s3.get_object(Bucket=bucket, Key="m", VersionId=v1)["Metadata"] == expected
    assert s3.head_object(Bucket=bucket, Key="m")["Metadata"] == {"other": "2"}


# -- the harness itself ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_server_lifecycle(kind):
    """A private server: answers on loopback, reset() empties it, stop() leaves nothing behind."""
    import socket

    from s3servers import S3Server

    with S3Server(kind) as srv:
        url, pid, port = srv.endpoint_url, srv.proc.pid, srv.port
        assert url == f"http://127.0.0.1:{port}"
        client = make_client(url)
        bucket = make_versioned_bucket(client)
        client.put_object(Bucket=bucket, Key="k", Body=b"x")
        srv.reset()
        assert bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    assert srv.proc is None and srv.endpoint_url is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
