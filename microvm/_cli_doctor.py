"""``microvm doctor``: can a sandbox run here? Each check prints one line and, when it
fails, a one-line fix.

Exit 0 only when a sandbox can run (QEMU, an accelerator, the kernel, the guest agent and
a writable ``$MICROVM_HOME`` with room); the uplink and virtio-fs checks are warnings
(``--net none`` sandboxes and image roots work without them).

Example::

    microvm doctor && microvm run --rm busybox:1.36 echo ok
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import click

__all__ = ["Check", "doctor_checks", "doctor_cmd"]

_MIN_FREE_MIB = 1024


@dataclass(frozen=True)
class Check:
    """One doctor line: ``name``, ``ok``, what was found, a fix, whether it blocks sandboxes.

    Example::

        >>> Check("qemu", True, "/usr/bin/qemu-system-x86_64").line()
        'ok    qemu: /usr/bin/qemu-system-x86_64'
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    def line(self) -> str:
        """The printed line (``ok``, ``FAIL`` or ``warn``, then the fix when not ok).

        Example::

            >>> Check("x", False, "missing", "install x", required=False).line()
            'warn  x: missing; fix: install x'
        """
        tag = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        fix = f"; fix: {self.fix}" if not self.ok and self.fix else ""
        return f"{tag}  {self.name}: {self.detail}{fix}"


def _home() -> Path:
    raw = os.environ.get("MICROVM_HOME")
    return Path(raw) if raw else Path.home() / ".microvm"


def doctor_checks() -> list[Check]:
    """Run every check (the KVM probe boots a one-instruction guest, under a second).

    Example::

        bad = [c for c in doctor_checks() if c.required and not c.ok]
    """
    from microvm.backends._qemu import QemuBackend, kvm_probe
    from microvm.errors import MicrovmError

    out: list[Check] = []
    qemu: str | None = None
    try:
        qemu = QemuBackend().qemu_binary()
        out.append(Check("qemu", True, qemu))
    except MicrovmError as e:
        out.append(Check("qemu", False, str(e).splitlines()[0].split(";")[0],
                         "apt-get install qemu-system-x86 (or set MICROVM_QEMU=/path/to/qemu)"))
    accel_env = os.environ.get("MICROVM_ACCEL", "")
    if qemu is None:
        out.append(Check("accelerator", False, "no QEMU to run a guest with", "install QEMU"))
    elif not os.path.exists("/dev/kvm"):
        out.append(Check("accelerator", True, "no /dev/kvm: TCG (software emulation, slower)"))
    else:
        probe = kvm_probe(qemu)
        if probe.ok:
            out.append(Check("accelerator", True, "KVM (probe guest ran)"))
        elif accel_env == "kvm":
            out.append(Check("accelerator", False,
                             f"MICROVM_ACCEL=kvm but KVM cannot run a guest: {probe.reason}",
                             "unset MICROVM_ACCEL (TCG is used then) or fix KVM"))
        else:
            out.append(Check("accelerator", True,
                             f"/dev/kvm exists but cannot run a guest ({probe.reason}): "
                             f"TCG is used (no boot hang)"))
    try:
        from microvm.kernel import find_kernel

        k = find_kernel()
        out.append(Check("kernel", k is not None, str(k.elf) if k else "not fetched",
                         "microvm kernel fetch"))
    except MicrovmError as e:
        out.append(Check("kernel", False, str(e), "unset MICROVM_KERNEL or point it at a file"))
    out.append(_agent_check())
    from microvm.backends._qemu import _find_virtiofsd

    vfs = _find_virtiofsd()
    out.append(Check("virtiofsd", vfs is not None, vfs or "not found",
                     "apt-get install virtiofsd (needed for -v volumes and directory images)",
                     required=False))
    from microvm.sandbox._netwiring import can_create_tap

    tap = can_create_tap()
    out.append(Check("tap uplink", tap,
                     "root/CAP_NET_ADMIN and /dev/net/tun available" if tap
                     else "cannot create TAP devices",
                     "run as root (or with CAP_NET_ADMIN), or use --net none", required=False))
    passt = shutil.which("passt")
    out.append(Check("passt", passt is not None, passt or "not found",
                     "apt-get install passt (rootless uplink)", required=False))
    out.append(_space_check())
    return out


def _agent_check() -> Check:
    override = os.environ.get("MICROVM_AGENT_BINARY")
    if override:
        ok = Path(override).is_file()
        return Check("guest agent", ok, override if ok else f"MICROVM_AGENT_BINARY={override!r} "
                     "is not a file", "unset MICROVM_AGENT_BINARY")
    import microvm

    path = Path(microvm.__file__).parent / "_bin" / "microvm-agent"
    if path.is_file():
        return Check("guest agent", True, str(path))
    cc = shutil.which("cc") or shutil.which("gcc")
    return Check("guest agent", cc is not None,
                 f"not built yet ({'built on first use with ' + cc if cc else 'no C compiler'})",
                 "apt-get install gcc (the agent is built on first use)")


def _space_check() -> Check:
    home = _home()
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return Check("MICROVM_HOME", False, f"{home} is not a directory",
                     "point MICROVM_HOME at a directory")
    if not os.access(probe, os.W_OK):
        return Check("MICROVM_HOME", False, f"{probe} is not writable",
                     "point MICROVM_HOME at a writable directory")
    free = shutil.disk_usage(probe).free // (1024 * 1024)
    return Check("MICROVM_HOME", free >= _MIN_FREE_MIB, f"{home}: {free} MiB free",
                 f"free at least {_MIN_FREE_MIB} MiB (microvm system prune) or move "
                 f"MICROVM_HOME")


@click.command("doctor")
def doctor_cmd() -> None:
    """Check that sandboxes can run here; each problem with a one-line fix.

    Exit 0 when a sandbox can run, 1 when not.

    \b
    Example:
      microvm doctor
    """
    checks = doctor_checks()
    for c in checks:
        click.echo(c.line())
    blocking = [c for c in checks if c.required and not c.ok]
    if blocking:
        click.echo(f"sandboxes cannot run here: {', '.join(c.name for c in blocking)}")
        raise SystemExit(1)
    click.echo("sandboxes can run here")
