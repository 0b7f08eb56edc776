"""VMM backends: one :class:`Backend` protocol, two implementations (QEMU microvm, libkrun).

Example::

    from microvm.backends import get_backend
    backend = get_backend("qemu")
    backend.check()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microvm.backends._qemu import QemuBackend, QemuHandle
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
from microvm.errors import BackendUnavailable

if TYPE_CHECKING:
    from microvm.backends._libkrun import COMPAT_NET_FEATURES, KrunError, Libkrun, LibkrunBackend

__all__ = [
    "COMPAT_NET_FEATURES",
    "Backend",
    "Disk",
    "KrunError",
    "Libkrun",
    "LibkrunBackend",
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


#: names loaded on first use: ``import microvm.backends`` does not load cffi for libkrun
_LAZY = {"COMPAT_NET_FEATURES", "KrunError", "Libkrun", "LibkrunBackend"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from microvm.backends import _libkrun

        return getattr(_libkrun, name)
    raise AttributeError(f"module 'microvm.backends' has no attribute {name!r}")
