"""``QemuBackend``: the guest under ``qemu-system-x86_64 -M microvm`` (KVM where real, else TCG).

Example::

    from microvm.backends import QemuBackend, VmSpec, Disk
    handle = QemuBackend().launch(VmSpec(kernel=elf, disks=[Disk(img)], rundir=rundir))
    handle.wait(timeout=30)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from microvm.backends.base import (
    Disk,
    ProcessGroup,
    Share,
    SpawnedVm,
    VmSpec,
    kvm_usable,
    prepare_rundir,
    wait_for_path,
)
from microvm.backends.console import ConsoleSink
from microvm.errors import BackendUnavailable, BootError

__all__ = ["QEMU_INSTALL_HINTS", "QemuBackend", "QemuHandle"]

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")

QEMU_INSTALL_HINTS = (
    "install QEMU: Debian/Ubuntu `apt-get install qemu-system-x86` (virtio-fs: `qemu-system-common` "
    "or `virtiofsd`); Fedora `dnf install qemu-system-x86-core virtiofsd`; "
    "macOS `brew install qemu` (no microvm/virtio-fs on macOS: use the libkrun backend)"
)


SECCOMP_POLICY = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
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
            return "kvm" if kvm_usable() else "tcg"
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
        """Raise :class:`BackendUnavailable` when QEMU is missing or KVM was forced but is not real.

        Example::

            QemuBackend(accel="kvm").check()
        """
        self.qemu_binary()
        if self.accel == "kvm" and not kvm_usable():
            raise BackendUnavailable(
                "accel='kvm' asked but /dev/kvm is missing or not real VMX/SVM (nested PVM cannot "
                "boot a stock kernel); use accel='tcg' or 'auto'"
            )

    def argv(self, spec: VmSpec, vfs_sockets: list[Path] | None = None) -> list[str]:
        """The full QEMU command line for ``spec`` (virtio-fs sockets given per share).

        Example::

            print(" ".join(QemuBackend().argv(spec)))
        """
        accel = self.resolved_accel()
        machine = "microvm,acpi=off"
        args = [self.qemu_binary()]
        if spec.shares:
            machine += ",memory-backend=mem"
            args += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on"]
        args += [
            "-M", machine,
            "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(spec.cpus),
            "-m", f"{spec.memory_mib}M",
            "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-kernel", str(spec.kernel),
            "-append", spec.kernel_cmdline(),
            "-global", "virtio-mmio.force-legacy=off",
        ]  # fmt: skip
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
