"""``LibkrunBackend``: cffi ABI-mode bindings to ``libkrun.so.1`` and a launcher subprocess per VM.

``krun_start_enter`` never returns (the VMM ``_exit``s with the guest's code),
so every VM runs in ``python -m microvm._launcher SPEC``, which builds the
context with these bindings and enters. The library path can be overridden
with ``MICROVM_LIBKRUN``.

Example::

    from microvm.backends._libkrun import Libkrun
    krun = Libkrun.open()                 # BackendUnavailable without libkrun
    krun.has_feature("blk"), krun.has_symbol("krun_add_virtiofs")
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from microvm.backends._console import ConsoleSink
from microvm.backends.base import (
    ProcessGroup,
    SpawnedVm,
    VmSpec,
    kvm_usable,
    prepare_rundir,
)
from microvm.errors import BackendUnavailable, MicrovmError

__all__ = [
    "CDEF",
    "FEATURES",
    "LIBKRUN_INSTALL_HINTS",
    "KrunError",
    "Libkrun",
    "LibkrunBackend",
    "spec_to_launch_config",
]

LIBKRUN_INSTALL_HINTS = (
    "install libkrun: Fedora `dnf install libkrun libkrunfw`; Debian/Ubuntu: no libkrun package "
    "(build from https://github.com/containers/libkrun with `make BLK=1 NET=1 && make install`, "
    "libkrunfw from Debian sid `libkrunfw5` or `microvm kernel fetch`); macOS "
    "`brew tap slp/krun && brew install libkrun`; or set MICROVM_LIBKRUN=/path/to/libkrun.so.1"
)

CDEF = """
int32_t krun_set_log_level(uint32_t level);
int32_t krun_has_feature(uint64_t feature);
int32_t krun_create_ctx(void);
int32_t krun_free_ctx(uint32_t ctx_id);
int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib);
int32_t krun_set_root(uint32_t ctx_id, const char *root_path);
int32_t krun_add_disk(uint32_t ctx_id, const char *block_id, const char *disk_path, bool read_only);
int32_t krun_set_root_disk_remount(uint32_t ctx_id, const char *device, const char *fstype,
                                   const char *options);
int32_t krun_add_virtiofs(uint32_t ctx_id, const char *c_tag, const char *c_path);
int32_t krun_set_exec(uint32_t ctx_id, const char *exec_path, const char *const argv[],
                      const char *const envp[]);
int32_t krun_set_env(uint32_t ctx_id, const char *const envp[]);
int32_t krun_set_workdir(uint32_t ctx_id, const char *workdir_path);
int32_t krun_set_rlimits(uint32_t ctx_id, const char *const rlimits[]);
int32_t krun_add_net_unixstream(uint32_t ctx_id, const char *c_path, int fd, uint8_t *const c_mac,
                                uint32_t features, uint32_t flags);
int32_t krun_add_net_tap(uint32_t ctx_id, char *c_tap_name, uint8_t *const c_mac,
                         uint32_t features, uint32_t flags);
int32_t krun_disable_implicit_console(uint32_t ctx_id);
int32_t krun_disable_implicit_vsock(uint32_t ctx_id);
int32_t krun_add_virtio_console_multiport(uint32_t ctx_id);
int32_t krun_add_console_port_inout(uint32_t ctx_id, uint32_t console_id, const char *name,
                                    int input_fd, int output_fd);
int32_t krun_set_kernel_console(uint32_t ctx_id, const char *console_id);
int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath);
int32_t krun_start_enter(uint32_t ctx_id);
"""

FEATURES = {"net": 0, "blk": 1, "gpu": 2, "input": 4, "tee": 6, "amd_sev": 7, "intel_tdx": 8}

# virtio-net feature bits libkrun's COMPAT_NET_FEATURES offers.
COMPAT_NET_FEATURES = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 10) | (1 << 11) | (1 << 14)

DEFAULT_LIBRARIES = (
    "libkrun.so.1",
    "/usr/lib64/libkrun.so.1",
    "/usr/lib/x86_64-linux-gnu/libkrun.so.1",
    "/usr/local/lib64/libkrun.so.1",
    "/usr/local/lib/libkrun.so.1",
    "/opt/homebrew/lib/libkrun.dylib",
)


class KrunError(MicrovmError):
    """A ``krun_*`` call returned a negative errno.

    Example::

        except KrunError as e: print(e.function, e.errno)
    """

    def __init__(self, function: str, code: int) -> None:
        self.function = function
        self.errno = -code
        name = errno.errorcode.get(-code, "?")
        super().__init__(f"{function} failed: {code} ({name}: {os.strerror(-code)})")


class Libkrun:
    """The loaded library; each ``krun_*`` is called through :meth:`call` (raises :class:`KrunError`).

    Example::

        krun = Libkrun.open("/usr/lib64/libkrun.so.1")
        ctx = krun.create_ctx()
        krun.call("krun_set_vm_config", ctx, 2, 512)
    """

    def __init__(self, ffi: Any, lib: Any, path: str) -> None:
        self.ffi = ffi
        self.lib = lib
        self.path = path
        self._keep: list[Any] = []

    @classmethod
    def open(cls, path: str | None = None) -> Libkrun:
        """dlopen ``path`` (else ``$MICROVM_LIBKRUN``, else the usual names); BackendUnavailable if absent.

        Example::

            Libkrun.open("/usr/lib64/libkrun.so.1")
        """
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        candidates = [path] if path else []
        env = os.environ.get("MICROVM_LIBKRUN")
        if not candidates and env:
            candidates = [env]
        if not candidates:
            candidates = list(DEFAULT_LIBRARIES)
        errors = []
        for c in candidates:
            try:
                return cls(ffi, ffi.dlopen(c), c)
            except OSError as e:
                errors.append(f"{c}: {e}")
        raise BackendUnavailable(
            f"libkrun not found ({'; '.join(errors[:3])}); {LIBKRUN_INSTALL_HINTS}"
        )

    def has_symbol(self, name: str) -> bool:
        """True when the library exports ``name`` (builds without BLK/NET lack some).

        Example::

            krun.has_symbol("krun_add_virtiofs")
        """
        try:
            getattr(self.lib, name)
        except AttributeError:
            return False
        return True

    def has_feature(self, feature: str) -> bool:
        """``krun_has_feature`` (libkrun >= 1.17.3), else inferred from which symbols exist.

        Example::

            krun.has_feature("blk")
        """
        if feature not in FEATURES:
            raise MicrovmError(
                f"unknown libkrun feature {feature!r}: use one of {sorted(FEATURES)}"
            )
        if self.has_symbol("krun_has_feature"):
            r = int(self.lib.krun_has_feature(FEATURES[feature]))
            if r >= 0:
                return r == 1
        probe = {"blk": "krun_add_disk", "net": "krun_add_net_unixstream"}.get(feature)
        return probe is not None and self.has_symbol(probe)

    def call(self, name: str, *args: Any) -> int:
        """Call ``name`` with ``args`` converted (str -> char*, list[str] -> NULL-terminated char*[]).

        Raises :class:`KrunError` on a negative result and :class:`BackendUnavailable`
        if the symbol is missing.

        Example::

            krun.call("krun_set_exec", ctx, "/bin/sh", ["-c", "true"], ["A=1"])
        """
        try:
            fn = getattr(self.lib, name)
        except AttributeError:
            raise BackendUnavailable(
                f"{self.path} lacks {name} (libkrun too old or built without that feature); "
                f"{LIBKRUN_INSTALL_HINTS}"
            )
        r = int(fn(*[self._conv(a) for a in args]))
        if r < 0:
            raise KrunError(name, r)
        return r

    def _conv(self, a: Any) -> Any:
        if isinstance(a, str):
            if "\x00" in a:
                raise MicrovmError(f"NUL byte in libkrun string argument {a!r}")
            c = self.ffi.new("char[]", a.encode())
            self._keep.append(c)
            return c
        if isinstance(a, (list, tuple)):
            items = [self._conv(x) for x in a]
            arr = self.ffi.new("char *[]", [*items, self.ffi.NULL])
            self._keep.append(arr)
            return arr
        if isinstance(a, bytes):
            b = self.ffi.new("uint8_t[]", a)
            self._keep.append(b)
            return b
        if a is None:
            return self.ffi.NULL
        return a

    def create_ctx(self) -> int:
        """``krun_create_ctx()``: a new context id.

        Example::

            ctx = krun.create_ctx()
        """
        return self.call("krun_create_ctx")


def spec_to_launch_config(spec: VmSpec, log_level: int = 0) -> dict[str, Any]:
    """The JSON-able launcher config for ``spec`` (what ``python -m microvm._launcher`` reads).

    Example::

        json.dumps(spec_to_launch_config(spec))
    """
    return {
        "cpus": spec.cpus,
        "memory_mib": spec.memory_mib,
        "init": spec.init,
        "disks": [{"path": str(d.path), "readonly": d.readonly} for d in spec.disks],
        "shares": [{"tag": s.tag, "path": str(s.source)} for s in spec.shares],
        "net_socket": str(spec.net_socket) if spec.net_socket else None,
        "mac": spec.mac,
        "console_log": str(spec.console_log),
        "console_socket": str(spec.console_socket),
        "console_limit": spec.console_limit,
        "agent_socket": str(spec.agent_socket),
        "rundir": str(spec.rundir),
        "log_level": log_level,
    }


class LibkrunBackend:
    """Run guests with libkrun (needs real KVM and ``libkrun.so.1``).

    ``library`` overrides the path; ``require_kvm=False`` skips the KVM check
    (used with the test double).

    Example::

        LibkrunBackend().check()   # BackendUnavailable on hosts without libkrun or KVM
    """

    name = "libkrun"

    def __init__(self, library: str | None = None, require_kvm: bool = True) -> None:
        self.library = library
        self.require_kvm = require_kvm

    def check(self) -> None:
        """Raise :class:`BackendUnavailable` without libkrun, without block support, or without real KVM.

        Example::

            LibkrunBackend().check()
        """
        krun = Libkrun.open(self.library)
        needed = ("krun_add_disk", "krun_add_console_port_inout", "krun_disable_implicit_vsock")
        if not all(krun.has_symbol(n) for n in needed):
            raise BackendUnavailable(
                f"{krun.path} lacks block devices or console ports (need libkrun >= 1.17 built "
                f"with BLK=1); {LIBKRUN_INSTALL_HINTS}"
            )
        if self.require_kvm and not kvm_usable():
            raise BackendUnavailable(
                "libkrun needs real KVM (vmx/svm, not nested PVM) and /dev/kvm; use the qemu backend"
            )

    def launch(self, spec: VmSpec) -> SpawnedVm:
        """Write ``launcher.json`` into the rundir and start ``python -m microvm._launcher`` on it.

        Example::

            vm = LibkrunBackend().launch(spec); vm.wait()
        """
        self.check()
        prepare_rundir(spec)
        cfg = spec_to_launch_config(spec)
        cfg["library"] = self.library
        cfg_path = spec.rundir / "launcher.json"
        cfg_path.write_text(json.dumps(cfg))
        env = dict(os.environ)
        if spec.kernel_library is not None:
            # libkrun dlopens libkrunfw.so.5 by name: let it find ours.
            lib_dir = str(spec.kernel_library.parent)
            env["LD_LIBRARY_PATH"] = ":".join(x for x in (lib_dir, env.get("LD_LIBRARY_PATH")) if x)
        # The capped console sink lives here, not in the launcher: the launcher ends with
        # libkrun's _exit, which would lose console bytes its own reader had not written yet.
        sink = ConsoleSink(spec.console_socket, spec.console_log, spec.console_limit)
        group = ProcessGroup()
        argv: Sequence[str] = [sys.executable, "-m", "microvm._launcher", str(cfg_path)]
        try:
            proc = group.spawn(argv, log=spec.rundir / "launcher.log", env=env)
        except BaseException:
            sink.close()
            raise
        return SpawnedVm(spec, group, proc, [sink.close])
