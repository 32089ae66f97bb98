"""Running versionfs the way operators do: mount(8) and fstab through the helper,
systemd units (verified), the scheduled-snapshot flow, readiness, logs, status."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import VERSIONFS, is_mounted, run_versionfs
from helpers import make_versions, version_dirs

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / "mount_helpers" / "mount.fuse.versionfs"
VERSIONFS_BIN = str(Path(sys.executable).parent / "versionfs")
UNITS = ["versionfs@.service", "versionfs-sync@.service", "versionfs-sync@.timer"]


@pytest.fixture
def src(tmp_path):
    return make_versions(tmp_path / "ops.h5", lambda g: g.create_dataset("x", data=np.arange(10)))



def daemon_argv(mnt: Path) -> list[str]:
    pid = int(os.getxattr(mnt, "user.versionfs.pid"))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def mount_options(path: Path) -> list[str]:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields[5].split(",") + fields[fields.index("-") + 3].split(",")
    return []


def test_helper_with_the_argv_mount_passes(src, mnt, tmp_path):
    env = {**os.environ, "VERSIONFS": VERSIONFS_BIN}
    opts = f"rw,nosuid,nodev,allow_other,_netdev,nofail,noauto,auto,user,users,defaults,x-systemd.automount,state_dir={tmp_path / 'st'}"
    result = subprocess.run([str(HELPER), str(src), str(mnt), "-o", opts], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert is_mounted(mnt) and np.load(mnt / "latest/x.npy").tolist() == list(range(10))
    options = mount_options(mnt)
    assert "allow_other" in options and "nosuid" in options
    assert (tmp_path / "st" / "staging").is_dir()  # state_dir= became --state-dir
    assert run_versionfs("umount", str(mnt)).returncode == 0
    fake = subprocess.run([str(HELPER), str(src), str(mnt), "-f", "-o", "ro,nofail"], env=env, capture_output=True, text=True)
    assert fake.returncode == 0 and not is_mounted(mnt) and "-o ro" in fake.stdout
    bad = subprocess.run([str(HELPER), str(tmp_path / "nope.h5"), str(mnt), "-o", "rw"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "no such file" in bad.stderr and not is_mounted(mnt)


@pytest.fixture
def installed_helper():
    """The helper in /sbin for mount(8), pointing at this checkout's versionfs."""
    target = Path("/sbin/mount.fuse.versionfs")
    if target.exists() and not os.environ.get("CI"):
        pytest.skip("a mount.fuse.versionfs is installed already; not replacing it")
    if not os.access("/sbin", os.W_OK):
        pytest.skip("cannot install into /sbin")
    text = HELPER.read_text().replace('VERSIONFS="${VERSIONFS:-/usr/local/bin/versionfs}"', f'VERSIONFS="{VERSIONFS_BIN}"')
    backup = target.read_bytes() if target.exists() else None
    target.write_text(text)
    target.chmod(0o755)
    yield target
    if backup is None:
        target.unlink()
    else:
        target.write_bytes(backup)


def test_mount_t_and_an_fstab_line(src, mnt, tmp_path, installed_helper):
    result = subprocess.run(["mount", "-t", "fuse.versionfs", str(src), str(mnt), "-o", "ro,nofail"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "staging" not in os.listdir(mnt) and (mnt / "latest/x.npy").exists()
    assert subprocess.run(["umount", str(mnt)]).returncode == 0
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test\n{src}  {mnt}  fuse.versionfs  allow_other,_netdev,nofail,noauto,x-systemd.requires=a,state_dir={tmp_path}/st  0 0\n")
    result = subprocess.run(["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "allow_other" in mount_options(mnt) and os.listdir(mnt / "staging")
    assert run_versionfs("umount", str(mnt)).returncode == 0


def unit_dir(tmp_path: Path, instance: str) -> Path:
    """The units as installed for one instance, with this checkout's versionfs."""
    out = tmp_path / "units"
    out.mkdir(exist_ok=True)
    for unit in UNITS:
        text = (REPO / "systemd" / unit).read_text().replace("/usr/local/bin/versionfs", VERSIONFS_BIN)
        (out / unit.replace("@.", f"@{instance}.")).write_text(text)
    return out


def test_units_pass_systemd_analyze_verify(tmp_path):
    instance = subprocess.run(["systemd-escape", "--path", "/mnt/weather data"], capture_output=True, text=True).stdout.strip()
    units = unit_dir(tmp_path, instance)
    result = subprocess.run(["systemd-analyze", "verify", *sorted(map(str, units.iterdir()))], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), result.stderr
    service = (REPO / "systemd/versionfs@.service").read_text()
    assert "Type=notify" in service and "Restart=on-failure" in service and "%f" in service


def exec_lines(unit: Path, instance_path: str, env_file: Path) -> list[list[str]]:
    """The unit's ExecStart commands as systemd would run them (%f, ${V} and $V)."""
    env = {}
    for line in env_file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    commands = []
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            words = []
            for word in shlex.split(line[len("ExecStart="):].replace("%f", instance_path)):
                if re.fullmatch(r"\$[A-Z_]+", word):
                    words += env.get(word[1:], "").split()
                else:
                    words.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env.get(m[1], ""), word))
            commands.append(words)
    return commands


def test_scheduled_snapshots(src, mnt, tmp_path):
    data = tmp_path / "export"
    data.mkdir()
    np.save(data / "readings.npy", np.arange(100.0))
    (data / "notes.md").write_text("first\n")
    env_file = tmp_path / "mnt.env"
    example = (REPO / "systemd/versionfs.env.example").read_text()
    env_file.write_text(example.replace("/srv/export/weather", str(data)).replace("/data/weather.h5", str(src)))
    assert run_versionfs("mount", str(src), str(mnt), "--state-dir", str(tmp_path / "st")).returncode == 0
    sync = unit_dir(tmp_path, "x") / "versionfs-sync@x.service"

    def run_job() -> str:
        for command in exec_lines(sync, str(mnt), env_file):
            result = subprocess.run(command, capture_output=True, text=True)
            assert result.returncode == 0, (command, result.stderr)
        return result.stdout.strip()

    first = run_job()
    assert first != "unchanged"
    assert run_job() == "unchanged"  # unchanged source: no version
    readings = np.arange(100.0)
    readings[7] = -1
    time.sleep(1.1)  # rsync's quick check compares whole seconds (and the size is the same)
    np.save(data / "readings.npy", readings)
    third = run_job()
    assert third not in ("unchanged", first)
    versions = version_dirs(mnt / "versions")
    assert versions[-2:] == [first, third] and len(versions) == 4  # __first_version__, v1 and two
    assert subprocess.run(["diff", "-r", "--exclude=.version.json", str(data), str(mnt / "versions" / third)]).returncode == 0
    diff = subprocess.run(["diff", "-rq", str(mnt / "versions" / first), str(mnt / "versions" / third)], capture_output=True, text=True)
    assert "readings.npy" in diff.stdout and "notes.md" not in diff.stdout
    # rsync's quick check sees committed files as they were: nothing is copied again.
    dry = subprocess.run(["rsync", "-a", "--delete", "--itemize-changes", "--dry-run", f"{data}/", f"{mnt}/staging/"], capture_output=True, text=True)
    transfers = [line for line in dry.stdout.splitlines() if not line.startswith(".d")]  # only directory times differ
    assert transfers == [], dry.stdout


def test_readiness_notification_and_journal_logs(src, mnt, tmp_path):
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "JOURNAL_STREAM": "8:1234"}
    proc = subprocess.Popen([*VERSIONFS, "mount", str(src), str(mnt), "-f", "--state-dir", str(tmp_path / "st")],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert sock.recv(100) == b"READY=1"
        assert is_mounted(mnt) and (mnt / "latest/x.npy").exists()  # usable when READY came
        proc.send_signal(15)
        assert sock.recv(100) == b"STOPPING=1"
        assert proc.wait(timeout=30) == 0
        logs = proc.stderr.read()
        assert "<6>versionfs.daemon: mounted" in logs  # journald priority prefixes
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


def test_status_says_health_and_what_is_staged(src, mount):
    m = mount(src)
    (m.path / "staging/new.bin").write_bytes(b"x")
    result = run_versionfs("status", str(m.path))
    assert result.returncode == 0
    assert result.stdout == "A new.bin\n"
    assert f"daemon {m.pid} healthy" in result.stderr and "2 versions" in result.stderr
    os.kill(m.pid, 9)
    result = run_versionfs("status", str(m.path))
    assert result.returncode == 1 and result.stderr.strip()


def test_progress_bar_on_a_terminal(src, mount):
    m = mount(src)
    (m.path / "staging/a.bin").write_bytes(b"a")
    command = shlex.join([*VERSIONFS, "commit", str(m.path)])
    # A terminal of a real size (script gives 0x0, on which tqdm draws nothing).
    result = subprocess.run(["script", "-qec", f"stty cols 100 rows 30; {command}", "/dev/null"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "commit" in result.stdout and "change" in result.stdout  # tqdm drew on the terminal


def test_stop_waits_for_a_running_commit(tmp_path, mount):
    src = make_versions(tmp_path / "big.h5", lambda g: g.create_dataset("x", data=np.zeros(2_000_000), chunks=(65_536,)))
    m = mount(src)
    np.save(m.path / "staging/y.npy", np.random.default_rng(0).standard_normal(4_000_000))
    commit = subprocess.Popen([*VERSIONFS, "commit", str(m.path), "-n", "during-stop"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    assert run_versionfs("umount", str(m.path)).returncode == 0  # waits for the daemon
    assert commit.wait(timeout=60) == 0 and commit.stdout.read().strip() == "during-stop"
    m2 = mount(src, "--state-dir", str(m.state))
    assert np.load(m2.path / "versions/during-stop/y.npy").shape == (4_000_000,)
    assert run_versionfs("status", str(m2.path)).stdout == ""


def test_secrets_never_reach_the_log():
    code = "import logging; from versionfs import logs; logs.setup(False); logging.getLogger('x').error('key is %s', 'S3CRETVALUE123')"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "S3CRETVALUE123"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "S3CRETVALUE123" not in result.stderr and "[redacted]" in result.stderr


def test_the_mount_reads_ahead_in_large_requests(src, mount):
    m = mount(src)
    dev = os.stat(m.path).st_dev
    with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb") as f:
        assert int(f.read()) == 8192  # root may raise it; FUSE's default is 128


def test_fstab_takes_every_daemon_option(src, mnt, tmp_path, moto_endpoint):
    """Every option of the options table, by its -o name, through the helper."""
    from s3servers import make_client, make_versioned_bucket

    env = {**os.environ, "VERSIONFS": VERSIONFS_BIN}
    cache = tmp_path / "cache"
    opts = f"allow_other,nofail,state_dir={tmp_path / 'st'},cache_dir={cache},cache_size=64M,autocommit=3600"
    result = subprocess.run([str(HELPER), str(src), str(mnt), "-o", opts], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = daemon_argv(mnt)
    assert argv[argv.index("--cache-size") + 1] == str(64 << 20) and argv[argv.index("--autocommit") + 1] == "3600.0"
    assert (mnt / "latest.h5").stat().st_size > 0  # builds the image, kept in cache_dir=
    assert any(p.is_file() for p in cache.rglob("*"))
    assert run_versionfs("umount", str(mnt)).returncode == 0
    # endpoint_url=: an S3 source from fstab.
    s3 = make_client(moto_endpoint)
    bucket = make_versioned_bucket(s3)
    s3.put_object(Bucket=bucket, Key="data/a.txt", Body=b"from fstab")
    result = subprocess.run([str(HELPER), f"s3://{bucket}/data", str(mnt), "-o", f"ro,endpoint_url={moto_endpoint}"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (mnt / "latest/a.txt").read_bytes() == b"from fstab"
    assert run_versionfs("umount", str(mnt)).returncode == 0
    # A bad value is one line naming the option, and nothing is mounted.
    bad = subprocess.run([str(HELPER), str(src), str(mnt), "-o", "cache_size=lots"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "cache_size=lots" in bad.stderr and not is_mounted(mnt)
