"""Short atheris runs of the gateway's parsers (DNS forwarder, C loop); the modules'
docstring examples run under pytest --doctest-modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fuzz
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("target", "corpus"), [
    ("fuzz_dns_forwarder.py", "dns_forwarder"),
    ("fuzz_gateway.py", "frame"),
], ids=["dns_forwarder", "gateway_loop"])
def test_short_fuzz_run(target: str, corpus: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    work = tmp_path / "corpus"
    work.mkdir()
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / target),
         "-max_total_time=5", "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", str(work),
         str(ROOT / "tests" / "fuzz" / "corpus" / corpus)],
        capture_output=True, text=True, timeout=50, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done" in out.stderr
