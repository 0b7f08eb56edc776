"""Fuzz rootfs.parse_reference: any text -> a Reference that round-trips, or InvalidReferenceError.

Run: python tests/fuzz/fuzz_rootfs_reference.py -max_total_time=10
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import rootfs


def TestOneInput(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(200)
    try:
        ref = rootfs.parse_reference(text)
    except rootfs.InvalidReferenceError:
        return
    again = rootfs.parse_reference(str(ref))
    if again != ref:
        raise AssertionError(f"round trip changed {text!r}: {ref} -> {again}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
