"""The kernel directory: fetch once into it (under a file lock), find it again later.

A kernel directory holds ``krunfw.elf`` (the PVH ELF QEMU boots), ``libkrunfw.so.5``
(what libkrun loads) and ``kernel.json`` (where they came from, with the ELF's sha256:
a corrupted ELF is noticed and rebuilt). :func:`find_kernel` looks in
``$MICROVM_KERNEL``, the checkout's ``vendor/`` and ``$MICROVM_HOME/kernel``;
:func:`fetch_kernel` fills a directory; concurrent fetches into one directory take
turns through a ``filelock`` lock file in it.

>>> find_kernel() is None or find_kernel().elf.is_file()
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import filelock

from microvm.errors import KernelError
from microvm.kernel._fetch import fetch_debian, fetch_wheel, sha256_file
from microvm.kernel._libkrunfw import LIB_NAME, SYSTEM_LIBS, load_payload, system_library
from microvm.kernel._pvh import pvh_elf_bytes
from rootfs import atomic_write, microvm_home

__all__ = ["ELF_NAME", "MANIFEST_NAME", "SOURCES", "Kernel", "check_dest",
           "default_kernel_dir", "ensure_kernel", "fetch_kernel", "find_kernel"]

ELF_NAME = "krunfw.elf"
"""The PVH ELF's file name in a kernel directory."""
MANIFEST_NAME = "kernel.json"
"""The manifest's file name in a kernel directory."""
SOURCES = ("auto", "system", "debian", "wheel")
"""What :func:`fetch_kernel` accepts as ``source``."""
LOCK_TIMEOUT = 900.0
"""Seconds a fetch waits for another one into the same directory."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A ready guest kernel: the PVH ELF for QEMU and the libkrunfw library it came from.

    >>> Kernel(Path("vendor/krunfw.elf"), Path("vendor/libkrunfw.so.5"), "debian").source
    'debian'
    """

    elf: Path
    library: Path
    source: str


def default_kernel_dir() -> Path:
    """``$MICROVM_HOME/kernel`` (``~/.microvm/kernel`` by default).

    >>> default_kernel_dir().name
    'kernel'
    """
    return microvm_home() / "kernel"


def _vendor_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "vendor"


def check_dest(dest: Path) -> Path:
    """Create ``dest`` if needed and make sure files can be written there; return it absolute.

    Raises :class:`microvm.KernelError` with one line naming the directory and why
    (for example ``/proc/x``, a path under a regular file, a read-only mount),
    before anything is downloaded.

    >>> check_dest(Path("vendor")).is_absolute()
    True
    >>> check_dest(Path("/proc/x"))
    Traceback (most recent call last):
    ...
    microvm.errors.KernelError: cannot use '/proc/x' as the kernel directory (...): give a writable directory
    """
    dest = dest.absolute()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise KernelError(
            f"cannot use {str(dest)!r} as the kernel directory ({why}): give a writable directory"
        ) from None
    return dest


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    dest.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(dest / ".lock"), timeout=LOCK_TIMEOUT):
        yield


def _write_kernel(library: Path, dest: Path, source: str) -> Kernel:
    payload = load_payload(library)
    elf = pvh_elf_bytes(payload)
    atomic_write(dest / ELF_NAME, elf)
    manifest = {
        "source": source,
        "library": str(library),
        "library_sha256": sha256_file(library),
        "krunfw_version": payload.version,
        "load_addr": payload.load_addr,
        "entry_addr": payload.entry_addr,
        "payload_size": len(payload.data),
        "elf_sha256": hashlib.sha256(elf).hexdigest(),
    }
    atomic_write(dest / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return Kernel(dest / ELF_NAME, library, source)


def fetch_kernel(dest: Path | None = None, *, source: str = "auto", force: bool = False) -> Kernel:
    """Make ``dest`` hold ``krunfw.elf`` (+ ``libkrunfw.so.5``) and return the :class:`Kernel`.

    ``source`` is ``auto`` (system library, then Debian, then the PyPI wheel),
    ``system``, ``debian`` or ``wheel``. Raises :class:`microvm.KernelError`.

    >>> fetch_kernel(Path("vendor"), source="ftp")
    Traceback (most recent call last):
    ...
    microvm.errors.KernelError: unknown kernel source 'ftp': use auto, system, debian or wheel
    >>> fetch_kernel(Path("vendor"))            # doctest: +SKIP
    Kernel(elf=PosixPath('.../vendor/krunfw.elf'), library=..., source='debian')
    """
    if source not in SOURCES:
        raise KernelError(f"unknown kernel source {source!r}: use auto, system, debian or wheel")
    dest = check_dest(dest or default_kernel_dir())
    with _locked(dest):
        if not force:
            existing = _from_dir(dest)
            if (
                existing is not None
                and source in ("auto", existing.source)
                and _elf_matches_manifest(dest)
            ):
                return existing
        if source in ("auto", "system"):
            lib = system_library()
            if lib is not None:
                return _write_kernel(lib, dest, "system")
            if source == "system":
                raise KernelError(
                    "no system libkrunfw.so.5 found (looked in " + ", ".join(SYSTEM_LIBS) + ")"
                )
        errors: list[str] = []
        with tempfile.TemporaryDirectory(prefix="krunfw-") as tmp:
            for name, fn in (("debian", fetch_debian), ("wheel", fetch_wheel)):
                if source not in ("auto", name):
                    continue
                try:
                    lib = fn(dest, Path(tmp))
                except KernelError as e:
                    errors.append(f"{name}: {e}")
                    continue
                return _write_kernel(lib, dest, name)
        raise KernelError("could not obtain libkrunfw: " + "; ".join(errors))


def _elf_matches_manifest(d: Path) -> bool:
    try:
        meta = json.loads((d / MANIFEST_NAME).read_text())
        return bool(sha256_file(d / ELF_NAME) == meta.get("elf_sha256"))
    except (OSError, ValueError):
        return False


def _from_dir(d: Path) -> Kernel | None:
    elf, lib, man = d / ELF_NAME, d / LIB_NAME, d / MANIFEST_NAME
    if not (elf.is_file() and man.is_file()):
        return None
    try:
        meta = json.loads(man.read_text())
    except (OSError, ValueError):
        return None
    library = lib if lib.is_file() else Path(str(meta.get("library", lib)))
    return Kernel(elf, library, str(meta.get("source", "unknown")))


def find_kernel() -> Kernel | None:
    """Locate an already fetched kernel: ``$MICROVM_KERNEL``, the checkout's ``vendor/``,
    ``$MICROVM_HOME/kernel``; None when there is none.

    >>> import os
    >>> os.environ["MICROVM_KERNEL"] = "/nonexistent/k.elf"
    >>> find_kernel()
    Traceback (most recent call last):
    ...
    microvm.errors.KernelError: MICROVM_KERNEL='/nonexistent/k.elf' is not a file
    >>> del os.environ["MICROVM_KERNEL"]
    """
    env = os.environ.get("MICROVM_KERNEL")
    if env:
        p = Path(env)
        if not p.is_file():
            raise KernelError(f"MICROVM_KERNEL={env!r} is not a file")
        return Kernel(p, p, "env")
    for d in (_vendor_dir(), default_kernel_dir()):
        k = _from_dir(d)
        if k is not None:
            return k
    return None


def ensure_kernel() -> Kernel:
    """:func:`find_kernel`, else :func:`fetch_kernel` into ``$MICROVM_HOME/kernel``.

    >>> ensure_kernel().elf.name                # doctest: +SKIP
    'krunfw.elf'
    """
    return find_kernel() or fetch_kernel()
