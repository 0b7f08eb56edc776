"""libkrunfw, the library that carries the guest kernel: find an installed one and copy
its kernel payload out through ``krunfw_get_kernel`` (cffi, ABI mode: nothing to compile).

>>> system_library() is None or system_library().name.startswith("libkrunfw")
True
"""

from __future__ import annotations

import os
from pathlib import Path

from microvm.errors import KernelError
from microvm.kernel._pvh import KernelPayload

__all__ = ["LIB_NAME", "SYSTEM_LIBS", "load_payload", "system_library"]

LIB_NAME = "libkrunfw.so.5"
"""The file name libkrunfw is stored under in a kernel directory."""

SYSTEM_LIBS = (
    "/usr/lib/x86_64-linux-gnu/libkrunfw.so.5",
    "/usr/lib64/libkrunfw.so.5",
    "/usr/lib/libkrunfw.so.5",
    "/usr/local/lib/libkrunfw.so.5",
    "/usr/local/lib64/libkrunfw.so.5",
)
"""Where distributions install libkrunfw (searched in this order)."""


def system_library() -> Path | None:
    """Path of an installed ``libkrunfw.so.5`` (``$MICROVM_LIBKRUNFW`` first), or None.

    >>> import os
    >>> os.environ["MICROVM_LIBKRUNFW"] = "/nonexistent/libkrunfw.so.5"
    >>> system_library() is None
    True
    >>> del os.environ["MICROVM_LIBKRUNFW"]
    """
    override = os.environ.get("MICROVM_LIBKRUNFW")
    if override:
        return Path(override) if os.path.exists(override) else None
    for p in SYSTEM_LIBS:
        if os.path.exists(p):
            return Path(p)
    return None


def load_payload(library: Path) -> KernelPayload:
    """Load ``library`` with cffi (ABI mode) and copy out the kernel via ``krunfw_get_kernel``.

    Raises :class:`microvm.KernelError` when the library cannot be loaded or
    lacks the symbol.

    >>> load_payload(Path("/nonexistent/libkrunfw.so.5"))
    Traceback (most recent call last):
    ...
    microvm.errors.KernelError: cannot load libkrunfw '/nonexistent/libkrunfw.so.5': ...
    """
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(
        "char *krunfw_get_kernel(size_t *load_addr, size_t *entry_addr, size_t *size);"
        "int krunfw_get_version(void);"
    )
    try:
        lib = ffi.dlopen(str(library))
    except OSError as e:
        raise KernelError(f"cannot load libkrunfw {str(library)!r}: {e}") from e
    try:
        get_kernel = lib.krunfw_get_kernel
    except AttributeError as e:
        raise KernelError(f"{str(library)!r} does not export krunfw_get_kernel") from e
    try:
        version = int(lib.krunfw_get_version())
    except AttributeError:
        version = -1
    load = ffi.new("size_t *")
    entry = ffi.new("size_t *")
    size = ffi.new("size_t *")
    ptr = get_kernel(load, entry, size)
    if ptr == ffi.NULL or size[0] == 0:
        raise KernelError(f"krunfw_get_kernel in {str(library)!r} returned no payload")
    data = bytes(ffi.buffer(ptr, size[0]))
    return KernelPayload(int(load[0]), int(entry[0]), data, version)
