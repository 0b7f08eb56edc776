"""The PVH ELF writer: wrap a raw x86-64 kernel image in the ELF64 QEMU boots as PVH.

QEMU's ``microvm`` machine boots an ELF ``-kernel`` through the PVH entry point named by
the kernel's Xen ``PHYS32_ENTRY`` ELF note. libkrunfw ships its kernel as a raw payload
(a load address, an entry address and the bytes), so we write the ELF ourselves: one
``PT_LOAD`` at the load address and one ``PT_NOTE`` carrying the kernel's own note,
found by scanning the payload (:func:`find_xen_note`).

Why our own writer and not a library: the job is 64 bytes of ELF header, two program
headers and a copy of one note. ELF libraries in Python read ELF (pyelftools) or pull
in a large native toolkit to edit existing binaries (LIEF); neither builds an executable
from a raw payload more simply than these few lines, which are covered by unit tests
against QEMU boots and by an atheris fuzz target (``tests/fuzz/fuzz_microvm_kernel.py``).

>>> import struct
>>> note = struct.pack("<III", 4, 8, XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\\x00"
>>> payload = KernelPayload(0x1000000, 0x1000000, note + struct.pack("<Q", 0x1000000), 5)
>>> elf = pvh_elf_bytes(payload)
>>> elf[:4], struct.unpack_from("<Q", elf, 24)[0] == payload.entry_addr
(b'\\x7fELF', True)
"""

from __future__ import annotations

import dataclasses
import struct

from microvm.errors import KernelError

__all__ = ["XEN_ELFNOTE_PHYS32_ENTRY", "KernelPayload", "find_xen_note", "pvh_elf_bytes"]

XEN_ELFNOTE_PHYS32_ENTRY = 18
"""The Xen ELF note type whose descriptor is the kernel's 32-bit PVH entry point."""


@dataclasses.dataclass(frozen=True)
class KernelPayload:
    """A raw kernel image (as ``krunfw_get_kernel`` returns it) with its load and entry
    addresses and the libkrunfw version it came from (-1 when unknown).

    >>> p = KernelPayload(0x1000000, 0x1000123, b"\\x90" * 16, 5)
    >>> hex(p.load_addr), len(p.data)
    ('0x1000000', 16)
    """

    load_addr: int
    entry_addr: int
    data: bytes
    version: int


def find_xen_note(data: bytes) -> bytes:
    """Return the complete Xen ``PHYS32_ENTRY`` ELF note (header, name, desc) found in ``data``.

    Raises :class:`microvm.KernelError` when there is none (the kernel cannot boot as PVH).

    >>> note = struct.pack("<III", 4, 8, 18) + b"Xen\\x00" + struct.pack("<Q", 0x1000000)
    >>> hex(struct.unpack_from("<Q", find_xen_note(b"\\x90" * 7 + note), 16)[0])
    '0x1000000'
    >>> find_xen_note(b"no note here")
    Traceback (most recent call last):
    ...
    microvm.errors.KernelError: kernel payload has no Xen PHYS32_ENTRY note: it cannot boot as PVH
    """
    pattern = struct.pack("<I", 4)
    tail = struct.pack("<I", XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\x00"
    start = 0
    while True:
        i = data.find(tail, start)
        if i < 0:
            raise KernelError("kernel payload has no Xen PHYS32_ENTRY note: it cannot boot as PVH")
        hdr = i - 8
        if hdr >= 0 and data[hdr : hdr + 4] == pattern:
            descsz = struct.unpack_from("<I", data, hdr + 4)[0]
            if descsz in (4, 8):
                return data[hdr : hdr + 16 + descsz]
        start = i + 1


def pvh_elf_bytes(payload: KernelPayload) -> bytes:
    """Wrap ``payload`` in an ELF64 (one PT_LOAD at its load address, one PT_NOTE) for QEMU.

    >>> note = struct.pack("<III", 4, 8, 18) + b"Xen\\x00" + struct.pack("<Q", 0x1000000)
    >>> elf = pvh_elf_bytes(KernelPayload(0x1000000, 0x1000123, note + bytes(5000), 5))
    >>> struct.unpack_from("<HH", elf, 16), struct.unpack_from("<H", elf, 56)[0]
    ((2, 62), 2)
    """
    note = find_xen_note(payload.data)
    ehdr_size, phdr_size, nph = 64, 56, 2
    note_off = ehdr_size + phdr_size * nph
    load_off = (note_off + len(note) + 0xFFF) & ~0xFFF
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        62,  # EM_X86_64
        1,
        payload.entry_addr,
        ehdr_size,  # e_phoff
        0,  # e_shoff
        0,
        ehdr_size,
        phdr_size,
        nph,
        64,
        0,
        0,
    )
    size = len(payload.data)
    ph_load = struct.pack(
        "<IIQQQQQQ", 1, 7, load_off, payload.load_addr, payload.load_addr, size, size, 0x1000
    )
    ph_note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    head = ehdr + ph_load + ph_note + note
    return head + bytes(load_off - len(head)) + payload.data
