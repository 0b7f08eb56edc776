"""The README's rootfs example runs twice in a row and leaves no prepared root behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support import require_binaries, require_root

ROOT = Path(__file__).resolve().parents[2]


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## rootfs: OCI images to guest root disks", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m is not None
    return m.group(1)


def test_readme_rootfs_example_twice_and_clean(tmp_path: Path) -> None:
    require_root()  # its Patch.remove bakes a whiteout (mknod)
    require_binaries("/bin/busybox", "mkfs.erofs", "mkfs.ext4")
    script = tmp_path / "example.py"
    script.write_text(_example())
    home = tmp_path / "home"
    env = {**os.environ, "MICROVM_HOME": str(home), "TMPDIR": str(tmp_path)}
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=120, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "'kind': 'overlay'" in proc.stdout
    assert list((home / "images" / "prepared").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example.py", "home"]
