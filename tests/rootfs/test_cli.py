"""``python -m rootfs`` end to end: build, list, prepare, unpack, rm, prune, typed errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import require_binaries


def _cli(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "rootfs", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_round_trip(busybox_tree: Path, tmp_path: Path) -> None:
    require_binaries("mkfs.erofs", "mkfs.ext4")
    home = tmp_path / "home"
    out = _cli(home, "build", str(busybox_tree), "local/bb:1", "--cmd", "/bin/sh").stdout
    assert out.startswith("docker.io/local/bb:1 sha256:")
    assert "docker.io/local/bb:1" in _cli(home, "list").stdout
    plan = json.loads(_cli(home, "prepare", "local/bb:1", "--upper-size-mib", "16").stdout)
    assert plan["kind"] == "overlay" and plan["lower"][0]["fstype"] == "erofs"
    _cli(home, "unpack", "local/bb:1", str(tmp_path / "root"))
    assert (tmp_path / "root/bin/busybox").is_file()
    _cli(home, "save", "local/bb:1", str(tmp_path / "bb.tar"))
    assert "docker.io/local/bb:1" in _cli(tmp_path / "home2", "load", str(tmp_path / "bb.tar")).stdout
    _cli(home, "rm", "local/bb:1")
    assert "removed" in _cli(home, "prune", "--grace", "0").stdout
    bad = _cli(home, "unpack", "Bad:ref", str(tmp_path / "x"), ok=False)
    assert bad.returncode == 1 and "bad repository component 'Bad'" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = _cli(home, "pull", "127.0.0.1:9/none:1", "--policy", "never", ok=False)
    assert missing.returncode == 1 and "policy=never" in missing.stderr
