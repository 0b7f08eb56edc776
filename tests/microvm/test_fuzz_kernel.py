"""A short atheris run of tests/fuzz/fuzz_microvm_kernel.py (payload scanner + ELF writer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fuzz
def test_short_fuzz_run() -> None:
    pytest.importorskip("atheris")
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / "fuzz_microvm_kernel.py"), "--seconds", "4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["crashes"] == 0 and res["runs"] > 1000
