"""make install / make uninstall into a temporary root (never the real /usr or
/etc), and what they install: the helper, the units, shell completion generated
from the parser (bash and zsh, run for real) and the man page."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make(target: str, root: Path) -> subprocess.CompletedProcess:
    # -o setup: the checkout's environment is in place already (make test made it).
    variables = [f"DESTDIR={root}", "PREFIX=/opt/vfs", "SBIN=/opt/vfs/sbin", "UNIT_DIR=/etc/systemd/system",
                 "ETC_DIR=/etc/versionfs"]
    return subprocess.run(["make", "-s", "-o", "setup", "-C", str(REPO), target, *variables],
                          capture_output=True, text=True, timeout=300)


def files_below(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def test_install_and_uninstall(tmp_path):
    root = tmp_path / "root"
    result = make("install", root)
    assert result.returncode == 0, result.stderr
    assert files_below(root) == [
        "etc/systemd/system/versionfs-sync@.service", "etc/systemd/system/versionfs-sync@.timer",
        "etc/systemd/system/versionfs@.service", "etc/versionfs/versionfs.env.example",
        "opt/vfs/bin/versionfs", "opt/vfs/sbin/mount.fuse.versionfs",
        "opt/vfs/share/bash-completion/completions/versionfs", "opt/vfs/share/man/man1/versionfs.1",
        "opt/vfs/share/zsh/site-functions/_versionfs"]
    command = root / "opt/vfs/bin/versionfs"
    assert subprocess.run([str(command), "--version"], capture_output=True, text=True).stdout.startswith("versionfs ")
    # The helper and the units run the command where PREFIX put it.
    assert 'VERSIONFS="/opt/vfs/bin/versionfs"' in (root / "opt/vfs/sbin/mount.fuse.versionfs").read_text()
    service = (root / "etc/systemd/system/versionfs@.service").read_text()
    assert "ExecStart=/opt/vfs/bin/versionfs mount" in service and "/usr/local" not in service

    # bash: the completion function completes commands, a command's flags and paths.
    bash = root / "opt/vfs/share/bash-completion/completions/versionfs"
    def complete(*words: str) -> list[str]:
        script = (f"source {bash}; COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}; "
                  "_shtab_versionfs; printf '%s\\n' \"${COMPREPLY[@]}\"")
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()
    assert complete("versionfs", "lo") == ["log"]
    assert {"--stat", "--name-only", "--json"} <= set(complete("versionfs", "diff", "--"))
    assert "--cache-size" in complete("versionfs", "mount", "--c")
    (tmp_path / "weather.h5").write_bytes(b"")
    assert complete("versionfs", "mount", "wea") == ["weather.h5"]
    # zsh: the function file loads through compinit and defines _versionfs.
    zsh = root / "opt/vfs/share/zsh/site-functions"
    script = f"fpath=({zsh} $fpath); autoload -Uz compinit && compinit -u -d {tmp_path}/zcomp; autoload -Uz _versionfs; whence -w _versionfs"
    out = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and "_versionfs: function" in out.stdout, out.stdout + out.stderr
    assert subprocess.run(["zsh", "-n", str(zsh / "_versionfs")]).returncode == 0
    assert (zsh / "_versionfs").read_text().startswith("#compdef versionfs")
    # The man page renders and documents every command and the exit codes.
    page = subprocess.run(["man", "-l", str(root / "opt/vfs/share/man/man1/versionfs.1")], capture_output=True, text=True,
                          env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"})
    assert page.returncode == 0, page.stderr
    for command in ("mount", "log", "show", "diff", "rollback", "completion"):
        assert f"COMMAND 'versionfs {command}'" in page.stdout
    assert "exit codes:" in page.stdout and "--cache-size SIZE" in page.stdout and "mount-helper" not in page.stdout

    result = make("uninstall", root)
    assert result.returncode == 0, result.stderr
    assert files_below(root) == []
    assert not (root / "etc/versionfs").exists()
