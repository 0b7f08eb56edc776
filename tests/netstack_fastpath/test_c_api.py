"""The C API (netstack.h) used from C, as a gateway loop would: built with ASan+UBSan."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "netstack", "csrc")


@pytest.mark.timeout(120)
def test_c_program_classifies_a_stream(tmp_path: object) -> None:
    cc = shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("needs a C compiler (build-essential)")
    exe = os.path.join(str(tmp_path), "smoke")
    subprocess.run([cc, "-std=c11", "-O1", "-g", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=undefined", "-Wall", "-Wextra", "-Werror",
                    "-Wno-unused-parameter", "-I", CSRC, os.path.join(HERE, "c_api_smoke.c"),
                    *sorted(glob.glob(os.path.join(CSRC, "*.c"))), "-o", exe, "-lpthread"],
                   check=True)
    out = subprocess.run([exe], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "n=3" in out.stdout
