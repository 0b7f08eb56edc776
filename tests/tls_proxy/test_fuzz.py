"""Short atheris runs of tls_proxy's parsers (a few seconds each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fuzz
@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["fuzz_tls_client_hello.py", "fuzz_tls_http1.py"])
def test_short_fuzz_run(target, tmp_path):
    pytest.importorskip("atheris")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / target), "-max_total_time=4",
         "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=50, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done" in out.stderr
