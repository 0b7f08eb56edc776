"""Short atheris runs of the rootfs fuzz targets (seeded with real and hostile layers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEEDS = Path(__file__).parent / "fuzz_seeds"


@pytest.mark.fuzz
@pytest.mark.parametrize("target", ["fuzz_rootfs_layer.py", "fuzz_rootfs_reference.py"])
def test_short_fuzz_run(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    shutil.copytree(SEEDS, corpus)  # libFuzzer writes new inputs into the corpus dir
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / target), "-max_total_time=4",
         "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},   # the target's mkdtemp() dirs stay in here
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr
