"""``benchmarks/tls_proxy.py`` leaves no private key behind: not when it finishes, not when
it is stopped by SIGTERM / SIGHUP / Ctrl-C in the middle of a run (its proxies' CA keys
and the upstream's key live in one temporary directory it removes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def _keys(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file() and (p.suffix == ".key" or "ca" in p.name)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_signalled_benchmark_removes_its_keys(tmp_path: Path, sig: signal.Signals) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.tls_proxy", "--quick", "--no-mitmproxy"],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # the rig is up once the first measurement starts
            seen.append(line)
            if "keep-alive requests/s" in line:
                break
        assert _keys(tmp), ("no key written: the test would prove nothing", seen)
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert list(tmp.iterdir()) == [], sorted(str(p) for p in tmp.rglob("*"))
