"""``QemuBackend``: the guest under ``qemu-system-x86_64 -M microvm`` (KVM where real, else TCG).

Example::

    from microvm.backends import QemuBackend, VmSpec, Disk
    handle = QemuBackend().launch(VmSpec(kernel=elf, disks=[Disk(img)], rundir=rundir))
    handle.wait(timeout=30)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from microvm.backends._console import ConsoleSink
from microvm.backends._qmp import QmpClient
from microvm.backends.base import (
    Disk,
    ProcessGroup,
    Share,
    SpawnedVm,
    VmHandle,
    VmSpec,
    accel_override,
    kvm_usable,
    prepare_rundir,
    wait_for_path,
)
from microvm.errors import BackendUnavailable, BootError

__all__ = ["QEMU_INSTALL_HINTS", "KvmProbe", "QemuBackend", "QemuHandle", "kvm_probe"]

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")

QEMU_INSTALL_HINTS = (
    "install QEMU: Debian/Ubuntu `apt-get install qemu-system-x86` (virtio-fs: `qemu-system-common` "
    "or `virtiofsd`); Fedora `dnf install qemu-system-x86-core virtiofsd`; "
    "macOS `brew install qemu` (no microvm/virtio-fs on macOS: use the libkrun backend)"
)


SECCOMP_POLICY = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: TCG's translation cache in MiB (QEMU 7.2 defaults to 1 GiB, of which a booted idle guest
#: touches ~46 MiB, more as it runs; 32 MiB was QEMU's default before 5.0): boot CPU time
#: is unchanged (benchmarks/sandbox.py), and a bigger working set is retranslated
TCG_TB_SIZE_MIB = 32
_SECCOMP_CACHE: dict[str, bool] = {}


def _find_qemu() -> str | None:
    env = os.environ.get("MICROVM_QEMU")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("qemu-system-x86_64")


def _find_virtiofsd() -> str | None:
    env = os.environ.get("MICROVM_VIRTIOFSD")
    if env:
        return env if os.access(env, os.X_OK) else None
    for p in VIRTIOFSD_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return shutil.which("virtiofsd")


# The KVM probe guest: PVH entry in 32-bit protected mode at 0x1000000, then
# `mov al, 0x31; out 0xf4, al; hlt; jmp hlt`. isa-debug-exit turns the write into
# QEMU's exit status (0x31 << 1) | 1 = 99.
_PROBE_LOAD = 0x1000000
_PROBE_CODE = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
_PROBE_EXIT = (0x31 << 1) | 1
_PROBE_TIMEOUT = 10.0
_PROBE_CACHE_NAME = "kvm-probe.json"
_PROBE_MEMO: dict[str, tuple[bool, str]] = {}


class KvmProbe:
    """Result of :func:`kvm_probe`: ``ok`` when KVM ran the probe guest, ``reason`` when not.

    Example::

        p = kvm_probe(QemuBackend().qemu_binary())
        print(p.ok, p.reason)
    """

    __slots__ = ("cached", "ok", "reason")

    def __init__(self, ok: bool, reason: str, cached: bool = False) -> None:
        self.ok = ok
        self.reason = reason
        self.cached = cached

    def __repr__(self) -> str:
        return f"KvmProbe(ok={self.ok!r}, reason={self.reason!r}, cached={self.cached!r})"


def _probe_elf() -> bytes:
    from microvm.kernel import KernelPayload, pvh_elf_bytes

    note = struct.pack("<III", 4, 4, 18) + b"Xen\x00" + struct.pack("<I", _PROBE_LOAD)
    data = _PROBE_CODE + bytes(16 - len(_PROBE_CODE)) + note
    return pvh_elf_bytes(KernelPayload(_PROBE_LOAD, _PROBE_LOAD, data, 0))


def _probe_key(qemu: str) -> str:
    """What the probe's answer depends on: this boot, this QEMU binary, this /dev/kvm."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    real = os.path.realpath(qemu)
    try:
        st = os.stat(real)
        parts.append(f"{real}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        parts.append(real)
    try:
        parts.append(f"kvm:{os.stat('/dev/kvm').st_rdev}")
    except OSError:
        parts.append("kvm:none")
    return "|".join(parts)


def _probe_cache_path() -> Path:
    from rootfs import microvm_home

    return microvm_home() / "cache" / _PROBE_CACHE_NAME


def _run_probe(qemu: str, timeout: float, accel: str = "kvm") -> tuple[bool, str, bool]:
    """Boot the probe guest under ``-accel kvm`` (tests use tcg): (ok, reason, definitive)."""
    with tempfile.TemporaryDirectory(prefix="microvm-kvmprobe-") as tmp:
        elf = Path(tmp) / "probe.elf"
        elf.write_bytes(_probe_elf())
        argv = [
            qemu, "-M", "microvm,acpi=off", "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max", "-m", "32",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-kernel", str(elf),
        ]  # fmt: skip
        try:
            r = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return False, f"the probe guest did not finish within {timeout:g} s", False
        except OSError as e:
            return False, f"cannot run {qemu}: {e.strerror}", False
    if r.returncode == _PROBE_EXIT:
        return True, "", True
    lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    first = lines[0] if lines else f"exit status {r.returncode}"
    return False, first[:160], True


def kvm_probe(qemu: str, *, timeout: float = _PROBE_TIMEOUT, refresh: bool = False) -> KvmProbe:
    """Can KVM run a guest here? Boots a one-instruction guest under ``qemu -accel kvm``.

    ``/dev/kvm`` can exist without being able to run a stock guest (nested PVM,
    a broken module): the probe catches that in well under a second instead of a
    boot timeout. The answer is cached in ``$MICROVM_HOME/cache/kvm-probe.json``
    per boot and QEMU binary (and in memory); ``refresh`` probes again.

    Example::

        if not kvm_probe("/usr/bin/qemu-system-x86_64").ok:
            print("use TCG")
    """
    key = _probe_key(qemu)
    if not refresh and key in _PROBE_MEMO:
        ok, reason = _PROBE_MEMO[key]
        return KvmProbe(ok, reason, cached=True)
    cache = _probe_cache_path()
    if not refresh:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(cache.read_text())
            if data["key"] == key:
                _PROBE_MEMO[key] = (bool(data["ok"]), str(data["reason"]))
                return KvmProbe(bool(data["ok"]), str(data["reason"]), cached=True)
    ok, reason, definitive = _run_probe(qemu, timeout)
    if definitive:
        _PROBE_MEMO[key] = (ok, reason)
        with contextlib.suppress(OSError):
            from rootfs import atomic_write

            body = {"key": key, "ok": ok, "reason": reason}
            atomic_write(cache, json.dumps(body).encode())
    return KvmProbe(ok, reason)


def _opt(value: str) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return value.replace(",", ",,")


QemuHandle = SpawnedVm
"""A running QEMU plus its virtiofsd helpers (see :class:`SpawnedVm`)."""


class QemuBackend:
    """Boot guests with QEMU's ``microvm`` machine.

    ``accel`` is ``auto`` (KVM only when :func:`kvm_usable`), ``kvm`` or ``tcg``.

    Example::

        QemuBackend(accel="tcg").launch(spec)
    """

    name = "qemu"

    def __init__(self, accel: str = "auto", qemu: str | None = None, seccomp: bool = True) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise BackendUnavailable(f"bad accel {accel!r}: use auto, kvm or tcg")
        self.accel = accel
        self._qemu = qemu
        self.seccomp = seccomp

    def supports_seccomp(self) -> bool:
        """True when this QEMU was built with ``-sandbox`` (seccomp) support.

        Example::

            QemuBackend().supports_seccomp()
        """
        q = self.qemu_binary()
        if q not in _SECCOMP_CACHE:
            try:
                out = subprocess.run(
                    [q, "-help"], capture_output=True, text=True, timeout=20
                ).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            _SECCOMP_CACHE[q] = "-sandbox" in out
        return _SECCOMP_CACHE[q]

    def resolved_accel(self) -> str:
        """``kvm`` or ``tcg`` as this backend will use it.

        Example::

            QemuBackend().resolved_accel()  # "tcg" without real KVM
        """
        if self.accel == "auto":
            forced = accel_override()
            if forced is not None:
                return forced
            if kvm_usable() and kvm_probe(self.qemu_binary()).ok:
                return "kvm"
            return "tcg"
        return self.accel

    def qemu_binary(self) -> str:
        """Path of qemu-system-x86_64, or raise :class:`BackendUnavailable`.

        Example::

            QemuBackend().qemu_binary()
        """
        q = self._qemu or _find_qemu()
        if not q or not os.access(q, os.X_OK):
            raise BackendUnavailable(
                f"qemu-system-x86_64 not found ({q or 'not on PATH'}); {QEMU_INSTALL_HINTS}"
            )
        return q

    def check(self) -> None:
        """Raise :class:`BackendUnavailable` when QEMU is missing, ``MICROVM_ACCEL`` is bad, or KVM was forced but cannot run a guest.

        Forced KVM (``accel="kvm"`` or ``MICROVM_ACCEL=kvm``) is checked with
        :func:`kvm_probe` (cached), so a ``/dev/kvm`` that cannot run a guest fails
        here in one line instead of at the boot timeout.

        Example::

            QemuBackend(accel="kvm").check()
        """
        q = self.qemu_binary()
        accel_override()  # a bad MICROVM_ACCEL fails here, whatever accel says
        if self.accel == "kvm" and not kvm_usable():
            raise BackendUnavailable(
                "accel='kvm' asked but /dev/kvm is missing or not real VMX/SVM (nested PVM cannot "
                "boot a stock kernel); use accel='tcg' or 'auto'"
            )
        if self.resolved_accel() == "kvm":
            probe = kvm_probe(q)
            if not probe.ok:
                how = "accel='kvm'" if self.accel == "kvm" else "MICROVM_ACCEL=kvm"
                raise BackendUnavailable(
                    f"{how} asked but KVM cannot run a guest on this host (probe under "
                    f"`{os.path.basename(q)} -accel kvm`: {probe.reason}); use MICROVM_ACCEL=tcg "
                    "or leave it unset"
                )

    def argv(self, spec: VmSpec, vfs_sockets: list[Path] | None = None) -> list[str]:
        """The full QEMU command line for ``spec`` (virtio-fs sockets given per share).

        Example::

            print(" ".join(QemuBackend().argv(spec)))
        """
        accel = self.resolved_accel()
        machine = "microvm,acpi=off"
        args = [self.qemu_binary()]
        if spec.memory_file is not None:
            # guest RAM in a file (snapshots): shared while this VM owns it, private (copy on
            # write) when it is a snapshot's frozen memory
            machine += ",memory-backend=mem"
            shared = "on" if spec.memory_shared else "off"
            args += ["-object", f"memory-backend-file,id=mem,size={spec.memory_mib}M,"
                                f"mem-path={_opt(str(spec.memory_file))},share={shared}"]
        elif spec.shares or accel == "tcg":
            # shares need shared guest RAM; under TCG a memfd also keeps guest RAM off
            # transparent huge pages (QEMU asks for them on anonymous RAM), so an idle guest
            # costs the host what it touched, not whole 2 MiB pages (~8 MiB less at 256 MiB)
            machine += ",memory-backend=mem"
            args += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"]
        args += [
            "-M", machine,
            "-accel", accel if accel == "kvm" else f"tcg,tb-size={TCG_TB_SIZE_MIB}",
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(spec.cpus),
            "-m", f"{spec.memory_mib}M",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-kernel", str(spec.kernel),
            "-append", spec.kernel_cmdline(),
            "-global", "virtio-mmio.force-legacy=off",
        ]  # fmt: skip
        if spec.qmp:
            args += ["-qmp", f"unix:{_opt(str(spec.qmp_socket))},server=on,wait=off"]
        if spec.incoming:
            args += ["-incoming", "defer"]
        if self.seccomp and self.supports_seccomp():
            # QEMU may not spawn, setuid, change resource controls or use obsolete syscalls.
            args += ["-sandbox", SECCOMP_POLICY]
        for i, d in enumerate(spec.disks):
            args += _disk_args(i, d)
        args += [
            "-device", "virtio-serial-device,max_ports=4",
            "-chardev", f"socket,id=con,path={_opt(str(spec.console_socket))},server=off",
            "-device", "virtconsole,chardev=con",
            "-chardev",
            f"socket,id=agentch,path={_opt(str(spec.agent_socket))},server=on,wait=off",
            "-device", "virtserialport,chardev=agentch,name=agent",
        ]  # fmt: skip
        if spec.net_socket is not None:
            args += [
                "-netdev",
                f"stream,id=n0,server=off,addr.type=unix,addr.path={_opt(str(spec.net_socket))}",
                "-device", f"virtio-net-device,netdev=n0,mac={spec.mac}",
            ]  # fmt: skip
        for i, (share, sock) in enumerate(zip(spec.shares, vfs_sockets or [], strict=False)):
            args += [
                "-chardev", f"socket,id=fs{i},path={_opt(str(sock))}",
                "-device", f"vhost-user-fs-device,chardev=fs{i},tag={share.tag}",
            ]  # fmt: skip
        return args

    def launch(self, spec: VmSpec) -> QemuHandle:
        """Start virtiofsd for each share, then QEMU; raise :class:`BootError` if they die at once.

        Example::

            handle = QemuBackend().launch(spec)
        """
        self.check()
        if not spec.kernel.is_file():
            raise BootError(
                f"kernel {str(spec.kernel)!r} does not exist (run `microvm kernel fetch`)"
            )
        prepare_rundir(spec)
        group = ProcessGroup()
        sink = ConsoleSink(spec.console_socket, spec.console_log, spec.console_limit)
        try:
            socks = [self._start_virtiofsd(group, spec, i, s) for i, s in enumerate(spec.shares)]
            proc = group.spawn(self.argv(spec, socks), log=spec.rundir / "qemu.log")
        except BaseException:
            group.kill()
            sink.close()
            raise
        return QemuHandle(spec, group, proc, [sink.close])

    # -- snapshots (SnapshotBackend) ---------------------------------------------------
    def pause(self, handle: VmHandle) -> None:
        """QMP ``stop`` (the spec needs ``qmp=True``).

        Example::

            QemuBackend().pause(handle)
        """
        with QmpClient.connect(handle.spec.qmp_socket) as q:
            q.execute("stop")

    def resume(self, handle: VmHandle) -> None:
        """QMP ``cont``.

        Example::

            QemuBackend().resume(handle)
        """
        with QmpClient.connect(handle.spec.qmp_socket) as q:
            q.execute("cont")

    def save_state(self, handle: VmHandle, state: Path, *, include_ram: bool) -> None:
        """``stop``, then migrate to an fd on ``state`` (RAM skipped unless ``include_ram``:
        ``x-ignore-shared``); the guest stays paused. An fd, not ``exec:``: QEMU runs
        under ``-sandbox spawn=deny``.

        Example::

            QemuBackend().save_state(handle, Path("snap/state"), include_ram=False)
        """
        with QmpClient.connect(handle.spec.qmp_socket) as q:
            q.execute("stop")
            _ignore_shared(q, not include_ram)
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                q.execute("getfd", {"fdname": "snapshot"}, fd=fd)
            finally:
                os.close(fd)
            q.execute("migrate", {"uri": "fd:snapshot"})
            q.wait_migration()

    def load_state(self, handle: VmHandle, state: Path, *, include_ram: bool) -> None:
        """Feed ``state`` to a VMM started with ``spec.incoming``; returns once it runs.

        Example::

            QemuBackend().load_state(handle, Path("snap/state"), include_ram=False)
        """
        with QmpClient.connect(handle.spec.qmp_socket) as q:
            _ignore_shared(q, not include_ram)
            fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
            try:
                q.execute("getfd", {"fdname": "snapshot"}, fd=fd)
            finally:
                os.close(fd)
            q.execute("migrate-incoming", {"uri": "fd:snapshot"})
            q.wait_migration()
            status = q.execute("query-status")
            if status.get("status") != "running":
                q.execute("cont")

    def _start_virtiofsd(self, group: ProcessGroup, spec: VmSpec, i: int, share: Share) -> Path:
        vfsd = _find_virtiofsd()
        if not vfsd:
            raise BackendUnavailable(
                f"virtiofsd not found (needed for shares); {QEMU_INSTALL_HINTS}"
            )
        src = share.source.resolve()
        if not src.is_dir():
            raise BootError(f"share {share.tag!r}: source {str(share.source)!r} is not a directory")
        sock = spec.rundir / f"vfs{i}.sock"
        if sock.exists():
            sock.unlink()
        cmd = [vfsd, f"--socket-path={sock}", "-o", f"source={src}", "-o", "cache=none"]
        if share.readonly and os.geteuid() == 0 and shutil.which("unshare"):
            # Enforce read-only on the host: a private mount namespace with a read-only bind.
            script = (
                'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
            )
            cmd = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                str(src),
                *cmd,
            ]
        log = spec.rundir / f"virtiofsd{i}.log"
        p = group.spawn(cmd, log=log)
        if not wait_for_path(sock, 10.0, p):
            raise BootError(
                f"virtiofsd for share {share.tag!r} did not create {sock}",
                log.read_text(errors="replace")[-2000:] if log.exists() else "",
            )
        return sock


def _disk_args(i: int, d: Disk) -> list[str]:
    ro = ",readonly=on" if d.readonly else ""
    return [
        "-drive", f"id=d{i},file={_opt(str(d.path))},format=raw,if=none{ro}",
        "-device", f"virtio-blk-device,drive=d{i}",
    ]  # fmt: skip


def _ignore_shared(q: QmpClient, on: bool) -> None:
    q.execute("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-ignore-shared", "state": on}]})
