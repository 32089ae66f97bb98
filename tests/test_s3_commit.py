"""S3 sources, write side: commits from staging/ become object versions and
delete markers, unchanged files are not uploaded, and every write is conditional."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from boto3.s3.transfer import TransferConfig

from conftest import run_versionfs
from s3servers import make_client, make_versioned_bucket
from versionfs.backends.s3 import S3Backend
from versionfs.errors import ConflictError


@pytest.fixture(params=["moto", "ministack"])
def endpoint(request):
    return request.getfixturevalue(f"{request.param}_endpoint")


def versions_of(s3, bucket, key):
    answer = s3.list_object_versions(Bucket=bucket, Prefix=key)
    return [v for v in answer.get("Versions", []) + answer.get("DeleteMarkers", []) if v["Key"] == key]


def test_commit_writes_changes_and_only_changes(endpoint, mount, tmp_path):
    s3 = make_client(endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="d/keep.txt", Body=b"keep")
    s3.put_object(Bucket=bucket, Key="d/edit.txt", Body=b"old")
    s3.put_object(Bucket=bucket, Key="d/gone.txt", Body=b"gone")
    s3.put_object(Bucket=bucket, Key="d/sub/deep.txt", Body=b"deep")
    big = os.urandom(20 * 1024 * 1024 + 5)
    (tmp_path / "big").write_bytes(big)
    s3.upload_file(str(tmp_path / "big"), bucket, "d/multi.bin",  # a multipart ETag, no stored SHA-256
                   Config=TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20))
    assert "-" in s3.head_object(Bucket=bucket, Key="d/multi.bin")["ETag"]
    m = mount(f"s3://{bucket}/d", "--endpoint-url", endpoint)
    staging = m.path / "staging"
    (staging / "edit.txt").write_bytes(b"new")
    (staging / "keep.txt").write_bytes(b"keep")  # rewritten, identical
    (staging / "multi.bin").write_bytes(big)  # identical to a multipart upload
    os.unlink(staging / "gone.txt")
    os.rename(staging / "sub", staging / "moved")
    (staging / "new" / "n.txt").parent.mkdir()
    (staging / "new/n.txt").write_bytes(b"n")
    status = sorted(run_versionfs("status", str(m.path)).stdout.split("\n"))
    assert status == ["", "A moved/", "A moved/deep.txt", "A new/", "A new/n.txt", "D gone.txt", "D sub/", "M edit.txt"]
    result = run_versionfs("commit", str(m.path), "-m", "tidy up")
    assert result.returncode == 0, result.stderr
    assert s3.get_object(Bucket=bucket, Key="d/edit.txt")["Body"].read() == b"new"
    assert s3.get_object(Bucket=bucket, Key="d/moved/deep.txt")["Body"].read() == b"deep"
    assert s3.get_object(Bucket=bucket, Key="d/new/n.txt")["Body"].read() == b"n"
    for key in ("d/gone.txt", "d/sub/deep.txt"):
        markers = s3.list_object_versions(Bucket=bucket, Prefix=key).get("DeleteMarkers", [])
        assert [m["IsLatest"] for m in markers if m["Key"] == key] == [True]  # a delete marker on top
    assert len(versions_of(s3, bucket, "d/keep.txt")) == 1  # not uploaded again
    assert len(versions_of(s3, bucket, "d/multi.bin")) == 1
    head = s3.head_object(Bucket=bucket, Key="d/edit.txt")
    assert head["Metadata"]["versionfs-message"] == "tidy%20up" and len(head["Metadata"]["versionfs-sha256"]) == 64
    assert run_versionfs("status", str(m.path)).stdout == ""
    assert (m.path / "latest/moved/deep.txt").read_bytes() == b"deep"
    assert not (m.path / "latest/gone.txt").exists()
    (staging / "edit.txt").write_bytes(b"new")  # identical to what versionfs wrote
    assert run_versionfs("commit", str(m.path)).stdout.strip() == "unchanged"


def test_a_chmod_alone_is_committed(endpoint, mount):
    """SEMANTICS.md § What a version keeps: a chmod of a file that is not written is a
    change (a copy of the object by the store, with the new mode in s3fs's metadata);
    a touch alone is not."""
    s3 = make_client(endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="d/run.sh", Body=b"#!/bin/sh\n", Metadata={"note": "kept"})
    s3.put_object(Bucket=bucket, Key="d/data.txt", Body=b"data")
    m = mount(f"s3://{bucket}/d", "--endpoint-url", endpoint)
    os.chmod(m.path / "staging/run.sh", 0o755)
    os.utime(m.path / "staging/data.txt", (1_600_000_000, 1_600_000_000))
    assert run_versionfs("status", str(m.path)).stdout.split("\n") == ["M run.sh", ""]
    result = run_versionfs("commit", str(m.path), "-m", "executable")
    assert result.returncode == 0, result.stderr
    head = s3.head_object(Bucket=bucket, Key="d/run.sh")
    assert int(head["Metadata"]["mode"]) == 0o100755 and head["Metadata"]["note"] == "kept"
    assert s3.get_object(Bucket=bucket, Key="d/run.sh")["Body"].read() == b"#!/bin/sh\n"
    assert len(versions_of(s3, bucket, "d/run.sh")) == 2 and len(versions_of(s3, bucket, "d/data.txt")) == 1
    assert os.stat(m.path / "latest/run.sh").st_mode & 0o777 == 0o755
    assert run_versionfs("status", str(m.path)).stdout == ""


def test_large_files_go_up_in_parts(endpoint, mount):
    s3 = make_client(endpoint)
    bucket = make_versioned_bucket(s3)
    m = mount(f"s3://{bucket}", "--endpoint-url", endpoint)
    body = os.urandom(70 * 1024 * 1024)
    (m.path / "staging/large.bin").write_bytes(body)
    assert run_versionfs("commit", str(m.path)).returncode == 0
    assert s3.head_object(Bucket=bucket, Key="large.bin")["ETag"].strip('"').endswith("-5")
    assert s3.get_object(Bucket=bucket, Key="large.bin")["Body"].read() == body
    (m.path / "staging/large.bin").write_bytes(body)
    assert run_versionfs("commit", str(m.path)).stdout.strip() == "unchanged"


def test_names_cannot_be_chosen(moto_endpoint, mount):
    s3 = make_client(moto_endpoint)
    bucket = make_versioned_bucket(s3)
    m = mount(f"s3://{bucket}", "--endpoint-url", moto_endpoint)
    (m.path / "staging/a").write_bytes(b"a")
    result = run_versionfs("commit", str(m.path), "-n", "mine")
    assert result.returncode == 1 and "named by the time" in result.stderr


@pytest.mark.parametrize("kind", ["put", "delete"])
def test_writes_are_conditional(ministack_endpoint, kind):
    """Another writer between staging's base and the write: the store refuses."""
    s3 = make_client(ministack_endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="k", Body=b"base")
    backend = S3Backend(f"s3://{bucket}", ministack_endpoint)
    backend.versions()
    base = backend.tree(backend.current())
    s3.put_object(Bucket=bucket, Key="k", Body=b"theirs")  # after the base was read
    from versionfs.backends.base import Change

    local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vfs-cond-{os.getpid()}")
    with open(local, "wb") as f:
        f.write(b"mine")
    change = Change("k", "file", local=local) if kind == "put" else Change("k", "delete")
    with pytest.raises(ConflictError) as e:
        backend.commit(None, [change], None, None, base)
    assert "k" in str(e.value) and "nothing was written" in str(e.value)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"theirs"
    s3.put_object(Bucket=bucket, Key="fresh", Body=b"theirs")  # a new key someone created meanwhile
    with pytest.raises(ConflictError):
        backend.commit(None, [Change("fresh", "file", local=local)], None, None, base)
    os.unlink(local)


def test_a_store_that_ignores_a_condition_loses_no_update(moto_endpoint, tmp_path):
    """moto ignores If-Match and If-None-Match on CompleteMultipartUpload: the
    commit finds its version on top of another writer's, removes it again and
    reports the conflict; the other writer's version is current once more."""
    s3 = make_client(moto_endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="k", Body=b"base")
    backend = S3Backend(f"s3://{bucket}", moto_endpoint)
    backend.versions()
    base = backend.tree(backend.current())
    s3.put_object(Bucket=bucket, Key="k", Body=b"theirs")  # after staging's base was read
    s3.put_object(Bucket=bucket, Key="fresh", Body=b"theirs too")  # a key someone created meanwhile
    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(os.urandom((64 << 20) + 5))  # over the multipart threshold
    small.write_bytes(os.urandom(6 << 20))
    backend.multipart_threshold, backend.part_size = 5 << 20, 5 << 20  # the small one in parts too
    from versionfs.backends.base import Change

    changes = [Change("k", "file", local=str(big)), Change("fresh", "file", local=str(small)),
               Change("other", "file", local=str(small))]
    with pytest.raises(ConflictError) as e:
        backend.commit(None, changes, None, None, base)
    assert "k" in str(e.value) and "fresh" in str(e.value) and "already written (1): other" in str(e.value)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"theirs"
    assert s3.get_object(Bucket=bucket, Key="fresh")["Body"].read() == b"theirs too"
    assert len(versions_of(s3, bucket, "k")) == 2 and len(versions_of(s3, bucket, "fresh")) == 1  # ours are gone
    assert s3.get_object(Bucket=bucket, Key="other")["Body"].read() == small.read_bytes()
    backend.close()


def test_two_daemons_on_one_prefix(endpoint, mount):
    s3 = make_client(endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="shared.txt", Body=b"v0")
    one = mount(f"s3://{bucket}", "--endpoint-url", endpoint)
    two = mount(f"s3://{bucket}", "--endpoint-url", endpoint)
    (one.path / "staging/shared.txt").write_bytes(b"from one")
    (two.path / "staging/shared.txt").write_bytes(b"from two")
    (two.path / "staging/other.txt").write_bytes(b"two's other")
    assert run_versionfs("commit", str(one.path)).returncode == 0
    deadline = time.monotonic() + 20
    while (two.path / "latest/shared.txt").read_bytes() != b"from one":  # appears within seconds
        assert time.monotonic() < deadline
        time.sleep(0.5)
    result = run_versionfs("commit", str(two.path))
    assert result.returncode == 3 and "shared.txt" in result.stderr
    assert s3.get_object(Bucket=bucket, Key="shared.txt")["Body"].read() == b"from one"
    subprocess.run(["cp", str(two.path / "latest/shared.txt"), str(two.path / "staging/shared.txt")], check=True)
    assert run_versionfs("commit", str(two.path)).returncode == 0  # the rest goes on top
    assert s3.get_object(Bucket=bucket, Key="other.txt")["Body"].read() == b"two's other"


def test_compact(endpoint):
    s3 = make_client(endpoint)
    bucket = make_versioned_bucket(s3)
    for body in [b"a", b"a", b"a", b"b", b"a"]:  # a run of three, then b, then a again
        s3.put_object(Bucket=bucket, Key="k", Body=body)
    # Seconds apart: moto lists a key's delete markers after its versions, so only
    # time can place the marker between them.
    time.sleep(1.05)
    s3.delete_object(Bucket=bucket, Key="k")
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="k", Body=b"a")  # across a delete marker: kept
    s3.put_object(Bucket=bucket, Key="other", Body=b"x")
    before = versions_of(s3, bucket, "k")
    dry = run_versionfs("compact", f"s3://{bucket}", "--dry-run", "--endpoint-url", endpoint)
    assert dry.returncode == 0 and dry.stdout.count("would remove") == 2
    assert versions_of(s3, bucket, "k") == before
    result = run_versionfs("compact", f"s3://{bucket}", "--endpoint-url", endpoint)
    assert result.returncode == 0 and result.stdout.count("removed s3://") == 2
    answer = s3.list_object_versions(Bucket=bucket, Prefix="k")
    bodies = [s3.get_object(Bucket=bucket, Key="k", VersionId=v["VersionId"])["Body"].read()
              for v in sorted(answer["Versions"], key=lambda v: v["LastModified"])]
    assert sorted(bodies) == sorted([b"a", b"b", b"a", b"a"]) and len(answer["DeleteMarkers"]) == 1
    assert run_versionfs("compact", f"s3://{bucket}", "--endpoint-url", endpoint).stdout == ""
    assert run_versionfs("compact", "/tmp/x.h5").returncode == 1


def protocol_members() -> set[str]:
    """Every name the backend protocol declares (attributes and methods)."""
    from versionfs.backends.base import Backend

    declared = set(Backend.__annotations__) | {n for n, v in vars(Backend).items() if callable(v)}
    return {n for n in declared if not n.startswith("_")}


def test_backends_declare_the_whole_protocol(moto_endpoint, tmp_path):
    """Each backend has every capability the rest asks of it (nothing is probed
    for, nor guessed from a source's name); what compact needs is known before
    a source is opened."""
    from versionfs.backends import backend_class, create_source, open_backend

    assert {"no_compaction", "duplicates", "remove_duplicate", "xattrs", "generated_names", "execution"} <= protocol_members()
    bucket = make_versioned_bucket(make_client(moto_endpoint))
    h5 = str(tmp_path / "new.h5")
    create_source(h5)
    for source, endpoint in ((f"s3://{bucket}", moto_endpoint), (h5, None)):
        backend = open_backend(source, endpoint)
        try:
            missing = {n for n in protocol_members() if not hasattr(backend, n)}
            assert not missing, f"{type(backend).__name__} lacks {missing}"
            assert backend_class(source) is type(backend)
            assert backend.duplicates() == []
        finally:
            backend.close()
    assert backend_class(h5).no_compaction and backend_class(f"s3://{bucket}").no_compaction is None


def test_rollback_on_s3(moto_endpoint, mount):
    s3 = make_client(moto_endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"first")
    time.sleep(1.05)
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"second")
    s3.put_object(Bucket=bucket, Key="b.txt", Body=b"added later")
    m = mount(f"s3://{bucket}", "--endpoint-url", moto_endpoint)
    time.sleep(1.05)
    result = run_versionfs("rollback", str(m.path), "@0")
    assert result.returncode == 0, result.stderr
    assert s3.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"first"
    assert "DeleteMarkers" in s3.list_object_versions(Bucket=bucket, Prefix="b.txt")
    assert sorted(os.listdir(m.path / "latest")) == ["a.txt"]
    assert len(os.listdir(m.path / "versions")) >= 3  # added to; history is never rewritten


def test_stored_sha256_is_one_form_whichever_the_store_kept():
    import base64
    import hashlib

    from versionfs.backends.s3 import SHA_META, stored_sha256

    digest = hashlib.sha256(b"content")
    by_versionfs = {"Metadata": {SHA_META: digest.hexdigest()}}
    by_the_store = {"Metadata": {}, "ChecksumSHA256": base64.b64encode(digest.digest()).decode()}
    assert stored_sha256(by_versionfs) == stored_sha256(by_the_store) == digest.hexdigest()  # compact compares these
    assert stored_sha256({"ChecksumSHA256": "abc=-3"}) is None  # a checksum of parts proves nothing here
    assert stored_sha256({}) is None
