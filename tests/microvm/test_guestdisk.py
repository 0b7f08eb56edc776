"""microvm.build_ext4: ext4 images from a directory with the agent injected."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from microvm import DiskError, build_ext4
from tests.support import require_binaries


def _debugfs(img: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(img)], capture_output=True, text=True).stdout


def test_build_with_agent(tmp_path: Path) -> None:
    require_binaries("mkfs.ext4", "debugfs")
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("box\n")
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELF fake agent")
    agent.chmod(0o600)
    img = build_ext4(src, tmp_path / "root.img", agent=agent, free_mib=1)
    st = _debugfs(img, "stat /.microvm/agent")
    assert "Mode:  0755" in st and "User:     0" in st
    assert _debugfs(img, "cat /.microvm/agent").startswith("\x7fELF fake agent")
    assert _debugfs(img, "cat /etc/hostname") == "box\n"
    listing = _debugfs(img, "ls /")
    for mp in ("proc", "sys", "dev", "tmp", "run"):
        assert mp in listing
    assert not (src / ".microvm").exists()  # source untouched


def test_bad_inputs_named(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="nope"):
        build_ext4(tmp_path / "nope", tmp_path / "x.img")
    (tmp_path / "d").mkdir()
    with pytest.raises(DiskError, match="missing-agent"):
        build_ext4(tmp_path / "d", tmp_path / "x.img", agent=tmp_path / "missing-agent")
    (tmp_path / "d" / "big").write_bytes(b"\0" * (3 << 20))
    with pytest.raises(DiskError, match="too small"):
        build_ext4(tmp_path / "d", tmp_path / "x.img", size_mib=1)
    assert not (tmp_path / "x.img").exists()
