"""Fuzz rootfs.apply_layer: any bytes -> applied safely or a RootfsError; never an escape.

Run: python tests/fuzz/fuzz_rootfs_layer.py -max_total_time=10 [corpus_dir]
Seeds are real layer tarballs (whiteouts, links, hostile names); atheris mutates them.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import rootfs
    from rootfs import UnpackLimits, UnpackState, apply_layer

BASE = tempfile.mkdtemp(prefix="fuzz-layer-")
OUTSIDE = os.path.join(BASE, "outside")
os.mkdir(OUTSIDE)


def TestOneInput(data: bytes) -> None:
    dest = tempfile.mkdtemp(dir=BASE)
    try:
        state = UnpackState(UnpackLimits(max_bytes=1 << 20, max_files=500))
        apply_layer(io.BytesIO(data), Path(dest), state=state)
    except rootfs.RootfsError:
        pass  # a typed refusal is the only acceptable failure
    finally:
        if os.listdir(OUTSIDE):
            raise AssertionError(f"escaped into {OUTSIDE}: {os.listdir(OUTSIDE)}")
        shutil.rmtree(dest, ignore_errors=True)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
