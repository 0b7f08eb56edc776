"""Short runs of the netstack atheris targets (ASan+UBSan build); longer runs by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import require_binaries

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.fuzz
@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", ["fuzz_frame", "fuzz_dns", "fuzz_client_hello"])
def test_fuzz_target_short_run(target: str, tmp_path: object) -> None:
    require_binaries("clang", "clang++", "ar")
    script = os.path.join(ROOT, "tests", "fuzz", f"{target}.py")
    seeds = os.path.join(ROOT, "tests", "fuzz", "corpus", target.removeprefix("fuzz_"))
    corpus = os.path.join(str(tmp_path), "corpus")
    os.makedirs(corpus)
    proc = subprocess.run(
        [sys.executable, script, "-max_total_time=3", "-rss_limit_mb=4096",
         f"-artifact_prefix={tmp_path}/", corpus, seeds],
        capture_output=True, text=True, timeout=170, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Using preloaded libfuzzer" in out          # the sanitizer runtime is active
    assert "inline 8-bit counters" in out             # C coverage reaches libFuzzer
    assert "Done" in out and "ERROR: AddressSanitizer" not in out
