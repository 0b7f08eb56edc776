"""``microvm`` image, volume and system commands (the rootfs store under docker's names),
driven in subprocesses with a private ``$MICROVM_HOME``; no guest is booted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _cli(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "microvm", *argv], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "MICROVM_HOME": str(home)})
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_build_images_save_load_rmi_prune_df(tmp_path: Path) -> None:
    home = tmp_path / "home"
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hi\n")
    assert _cli(home, "image", "build", str(root), "local/app:1").returncode == 0
    assert "docker.io/local/app:1" in _cli(home, "images").stdout
    archive = tmp_path / "app.tar"
    assert _cli(home, "image", "save", "local/app:1", str(archive)).returncode == 0
    assert archive.stat().st_size > 0
    assert _cli(home, "rmi", "local/app:1").returncode == 0
    assert "local/app:1" not in _cli(home, "image", "ls").stdout
    assert _cli(home, "image", "load", str(archive)).returncode == 0
    assert "local/app:1" in _cli(home, "images").stdout
    r = _cli(home, "rmi", "local/ghost:9")
    assert r.returncode == 125 and len(r.stderr.splitlines()) == 1 and "ghost" in r.stderr
    df = _cli(home, "system", "df")
    assert df.returncode == 0 and df.stdout.splitlines()[1].startswith("images\t1\t")
    assert _cli(home, "system", "prune", "--grace", "0").returncode == 0


def test_volumes_ls_rm_prune(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for n in ("cache", "data"):
        (home / "volumes" / n).mkdir(parents=True)
        (home / "volumes" / n / "f").write_bytes(b"x" * 10_000)
    assert [ln.split("\t")[0] for ln in _cli(home, "volume", "ls").stdout.splitlines()] == \
        ["NAME", "cache", "data"]
    assert _cli(home, "volume", "rm", "cache").returncode == 0
    r = _cli(home, "volume", "rm", "cache")
    assert r.returncode == 125 and "'cache'" in r.stderr
    assert _cli(home, "volume", "prune").stdout.splitlines()[0] == "data"
    assert list((home / "volumes").iterdir()) == []
