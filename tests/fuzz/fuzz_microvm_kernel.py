"""Fuzz microvm.kernel's payload scanner and PVH ELF writer (atheris).

Property: for any payload, ``find_xen_note`` either returns a well-formed Xen
PHYS32_ENTRY note or raises ``KernelError``; when it succeeds, the ELF from
``pvh_elf_bytes`` parses back to exactly that payload at the load address.

    python tests/fuzz/fuzz_microvm_kernel.py --seconds 10

The last line printed is JSON: ``{"engine", "runs", "seconds", "crashes"}``.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from microvm.errors import KernelError  # noqa: E402
from microvm.kernel._pvh import KernelPayload, find_xen_note, pvh_elf_bytes  # noqa: E402

NOTE = struct.pack("<III", 4, 8, 18) + b"Xen\x00" + struct.pack("<Q", 0x1000000)
SEEDS = [
    b"",
    NOTE,
    b"\x90" * 64 + NOTE + b"\xcc" * 64,
    struct.pack("<III", 4, 4, 18) + b"Xen\x00" + b"\x00\x00\x00\x01",
    struct.pack("<III", 4, 99, 18) + b"Xen\x00",
    b"\x12\x00\x00\x00Xen\x00" * 3,
]


def check(data: bytes) -> None:
    try:
        note = find_xen_note(data)
    except KernelError:
        return
    namesz, descsz, ntype = struct.unpack_from("<III", note)
    assert (namesz, ntype, note[12:16]) == (4, 18, b"Xen\x00"), note
    assert descsz in (4, 8) and len(note) == 16 + descsz and note in data
    elf = pvh_elf_bytes(KernelPayload(0x1000000, 0x1000123, data, 5))
    phoff = struct.unpack_from("<Q", elf, 32)[0]
    _t, _f, off, vaddr, paddr, filesz, memsz, _a = struct.unpack_from("<IIQQQQQQ", elf, phoff)
    assert (vaddr, paddr, filesz, memsz) == (0x1000000, 0x1000000, len(data), len(data))
    assert elf[off : off + filesz] == data
    _t, _f, noff, _v, _p, nsz, _m, _a = struct.unpack_from("<IIQQQQQQ", elf, phoff + 56)
    assert elf[noff : noff + nsz] == note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ns, rest = ap.parse_known_args()
    for s in SEEDS:
        check(s)
    import os

    import atheris

    import microvm.kernel._pvh as kernel_mod

    # coverage feedback for the code under test
    kernel_mod.find_xen_note = atheris.instrument_func(kernel_mod.find_xen_note)
    kernel_mod.pvh_elf_bytes = atheris.instrument_func(kernel_mod.pvh_elf_bytes)
    globals()["find_xen_note"] = kernel_mod.find_xen_note
    globals()["pvh_elf_bytes"] = kernel_mod.pvh_elf_bytes
    runs = 0
    deadline = time.monotonic() + ns.seconds

    def one(data: bytes) -> None:
        nonlocal runs
        runs += 1
        if time.monotonic() > deadline:
            print(
                json.dumps({"engine": "atheris", "runs": runs, "seconds": ns.seconds, "crashes": 0})
            )
            sys.stdout.flush()
            os._exit(0)
        # splice the real note into some inputs so the success path is exercised too
        if data[:1] == b"N":
            cut = data[1] % (len(data) or 1) if len(data) > 1 else 0
            data = data[:cut] + NOTE + data[cut:]
        check(data)

    atheris.Setup([sys.argv[0], *rest, "-max_len=4096"], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
