"""VMM backends: one :class:`Backend` protocol, two implementations (QEMU microvm, libkrun).

Example::

    from microvm.backends import get_backend
    backend = get_backend("qemu")
    backend.check()
"""

from __future__ import annotations

from microvm.backends.base import (
    Backend,
    Disk,
    ProcessGroup,
    Share,
    VmHandle,
    VmSpec,
    console_tail,
    kvm_usable,
)
from microvm.backends.qemu import QemuBackend, QemuHandle
from microvm.errors import BackendUnavailable

__all__ = [
    "Backend",
    "Disk",
    "ProcessGroup",
    "QemuBackend",
    "QemuHandle",
    "Share",
    "VmHandle",
    "VmSpec",
    "console_tail",
    "get_backend",
    "kvm_usable",
]


def get_backend(name: str) -> Backend:
    """A backend by name: ``qemu`` or ``libkrun``.

    Example::

        get_backend("libkrun").check()   # BackendUnavailable without libkrun.so.1
    """
    if name == "qemu":
        return QemuBackend()
    if name == "libkrun":
        from microvm.backends._libkrun import LibkrunBackend

        return LibkrunBackend()
    raise BackendUnavailable(f"unknown backend {name!r}: use 'qemu' or 'libkrun'")
