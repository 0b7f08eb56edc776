"""The guest kernel: fetch libkrunfw, verify it, and turn its payload into a PVH ELF for QEMU.

libkrunfw ships the Linux kernel that libkrun boots as a raw image inside a shared
library; ``krunfw_get_kernel()`` returns it together with its load and entry
addresses. QEMU's ``microvm`` machine boots it once it is wrapped in an ELF64
with one ``PT_LOAD`` at the load address and a ``PT_NOTE`` carrying the
kernel's own Xen ``PHYS32_ENTRY`` note (found by scanning the payload).

One job per module:

* :mod:`microvm.kernel._store`: the kernel directory (:func:`fetch_kernel` under a file
  lock, :func:`find_kernel`, :func:`ensure_kernel`, :class:`Kernel`);
* :mod:`microvm.kernel._fetch`: the pinned sources (Debian's ``libkrunfw5`` with a private
  apt state, the PyPI ``microsandbox`` 0.7.11 wheel), verified against pinned sha256s;
* :mod:`microvm.kernel._libkrunfw`: an installed ``libkrunfw.so.5`` and its payload (cffi);
* :mod:`microvm.kernel._pvh`: the PVH ELF writer (and why we keep our own).

The command line is ``microvm kernel fetch|path`` (``python -m microvm.kernel`` runs the
same commands).

>>> from microvm.kernel import Kernel, ensure_kernel
>>> kernel = ensure_kernel()          # doctest: +SKIP
>>> kernel.elf.name                   # doctest: +SKIP
'krunfw.elf'
"""

from microvm.kernel._fetch import DEBIAN_PIN, WHEEL_PIN, DebianPin, WheelPin
from microvm.kernel._libkrunfw import load_payload, system_library
from microvm.kernel._pvh import KernelPayload, find_xen_note, pvh_elf_bytes
from microvm.kernel._store import (
    Kernel,
    check_dest,
    default_kernel_dir,
    ensure_kernel,
    fetch_kernel,
    find_kernel,
)

__all__ = [
    "DEBIAN_PIN",
    "WHEEL_PIN",
    "DebianPin",
    "Kernel",
    "KernelPayload",
    "WheelPin",
    "check_dest",
    "default_kernel_dir",
    "ensure_kernel",
    "fetch_kernel",
    "find_kernel",
    "find_xen_note",
    "load_payload",
    "pvh_elf_bytes",
    "system_library",
]
