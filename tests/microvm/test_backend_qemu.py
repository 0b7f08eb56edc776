"""QemuBackend: argv, validation, and real boots under QEMU (TCG here) with a tiny static init."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from microvm.backends import Disk, QemuBackend, Share, VmSpec, console_tail, get_backend, kvm_usable
from microvm.errors import BackendUnavailable, MicrovmError
from microvm.kernel import Kernel
from tests.support import require_binaries

pytestmark = pytest.mark.vm

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


def _spec(kernel: Kernel, disk: Path, rundir: Path, **kw) -> VmSpec:
    return VmSpec(kernel=kernel.elf, disks=[Disk(disk)], rundir=rundir, memory_mib=256, **kw)


def test_spec_validation_names_bad_values(tmp_path: Path) -> None:
    d = [Disk(tmp_path / "x")]
    with pytest.raises(MicrovmError, match="bad cpus 0"):
        VmSpec(kernel=tmp_path, disks=d, rundir=tmp_path, cpus=0)
    with pytest.raises(MicrovmError, match="bad memory_mib 8"):
        VmSpec(kernel=tmp_path, disks=d, rundir=tmp_path, memory_mib=8)
    with pytest.raises(MicrovmError, match="bad mac 'zz'"):
        VmSpec(kernel=tmp_path, disks=d, rundir=tmp_path, mac="zz")
    with pytest.raises(MicrovmError, match="at least one disk"):
        VmSpec(kernel=tmp_path, disks=[], rundir=tmp_path)
    with pytest.raises(MicrovmError, match="bad virtio-fs tag"):
        Share("bad tag", tmp_path)
    with pytest.raises(MicrovmError, match="duplicate"):
        VmSpec(kernel=tmp_path, disks=d, rundir=tmp_path, shares=[Share("a", tmp_path)] * 2)
    with pytest.raises(MicrovmError, match="too long"):
        VmSpec(kernel=tmp_path, disks=d, rundir=tmp_path / ("x" * 120))
    with pytest.raises(BackendUnavailable, match="bad accel 'xen'"):
        QemuBackend(accel="xen")
    with pytest.raises(BackendUnavailable, match="unknown backend 'vbox'"):
        get_backend("vbox")


def test_argv_has_devices_in_order(tmp_path: Path) -> None:
    spec = VmSpec(
        kernel=tmp_path / "k.elf",
        disks=[Disk(tmp_path / "root,1.img"), Disk(tmp_path / "ro.img", readonly=True)],
        rundir=tmp_path,
        cpus=2,
        memory_mib=384,
        net_socket=tmp_path / "net.sock",
        mac="02:aa:bb:cc:dd:ee",
        shares=[Share("data", tmp_path)],
    )
    a = QemuBackend(accel="tcg").argv(spec, [tmp_path / "vfs0.sock"])
    s = " ".join(a)
    assert "-M microvm,acpi=off,memory-backend=mem" in s and "-accel tcg" in s
    assert "memory-backend-memfd,id=mem,size=384M,share=on" in s
    assert "-smp 2" in s and "-no-reboot" in s and "virtio-mmio.force-legacy=off" in s
    assert (
        "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny" in s
    )  # Debian QEMU has seccomp
    assert "-sandbox" not in QemuBackend(accel="tcg", seccomp=False).argv(spec)
    assert "file=" + str(tmp_path / "root,,1.img") in s  # commas escaped for QEMU
    assert s.index("drive=d0") < s.index("drive=d1") < s.index("virtio-serial-device")
    assert "readonly=on" in a[a.index("-drive", a.index("-drive") + 1) + 1]
    assert "virtserialport,chardev=agentch,name=agent" in s
    assert f"addr.path={tmp_path}/net.sock" in s and "mac=02:aa:bb:cc:dd:ee" in s
    assert "vhost-user-fs-device,chardev=fs0,tag=data" in s
    cmdline = a[a.index("-append") + 1]
    assert "console=hvc0" in cmdline and "reboot=t" in cmdline and "panic=-1" in cmdline
    assert "init=/.microvm/agent" in cmdline and "root=/dev/vda rw" in cmdline


def test_missing_qemu_gives_install_hints(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MICROVM_QEMU", str(tmp_path / "no-qemu"))
    with pytest.raises(BackendUnavailable) as ei:
        QemuBackend().check()
    msg = str(ei.value)
    assert "Debian/Ubuntu" in msg and "Fedora" in msg and "macOS" in msg


def test_kvm_detection(monkeypatch) -> None:
    monkeypatch.setenv("MICROVM_ACCEL", "tcg")
    assert kvm_usable() is False
    monkeypatch.delenv("MICROVM_ACCEL")
    real = os.path.exists("/dev/kvm") and not os.path.exists("/sys/module/kvm_pvm")
    if not real:
        assert kvm_usable() is False
        assert QemuBackend().resolved_accel() == "tcg"
        with pytest.raises(BackendUnavailable, match="nested PVM"):
            QemuBackend(accel="kvm").check()


def test_boot_prints_and_exits(kernel: Kernel, init_disk: Path, tmp_path: Path) -> None:
    require_binaries("qemu-system-x86_64")
    spec = _spec(kernel, init_disk, tmp_path / "run")
    h = QemuBackend().launch(spec)
    try:
        assert h.wait(timeout=45) == 0
    finally:
        h.kill()
    assert "GUEST-INIT-UP" in console_tail(spec.console_log)
    assert spec.agent_socket.exists() or True  # QEMU removes its socket on exit on some versions


def test_virtiofs_share_and_readonly(kernel: Kernel, init_disk: Path, tmp_path: Path) -> None:
    require_binaries("qemu-system-x86_64", VIRTIOFSD)
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("from-the-host")
    spec = _spec(
        kernel, init_disk, tmp_path / "run", shares=[Share("hostdir", share, readonly=True)],
        cmdline_extra="share=hostdir",
    )  # fmt: skip
    h = QemuBackend().launch(spec)
    try:
        assert h.wait(timeout=45) == 0
    finally:
        h.kill()
    out = console_tail(spec.console_log)
    assert "SHARE:from-the-host" in out
    assert "SHARE-WRITE-DENIED" in out  # read-only enforced on the host side
    assert not (share / "guest-wrote.txt").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_killing_host_process_leaves_no_orphans(
    kernel: Kernel, init_disk: Path, tmp_path: Path
) -> None:
    """A host process running a VM (with virtiofsd) is SIGKILLed: QEMU and virtiofsd die with it."""
    require_binaries("qemu-system-x86_64", VIRTIOFSD)
    (tmp_path / "share").mkdir()
    pids = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from microvm.backends import Disk, QemuBackend, Share, VmSpec
        spec = VmSpec(kernel=Path({str(kernel.elf)!r}), disks=[Disk(Path({str(init_disk)!r}))],
                      rundir=Path({str(tmp_path / "run")!r}), memory_mib=256,
                      shares=[Share("s", Path({str(tmp_path / "share")!r}))], cmdline_extra="hang")
        h = QemuBackend().launch(spec)
        Path({str(pids)!r}).write_text(" ".join(map(str, h.helper_pids)))
        time.sleep(600)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not pids.exists() or not pids.read_text():
            assert time.monotonic() < deadline, "child never launched the VM"
            assert p.poll() is None, "child died"
            time.sleep(0.05)
        children = [int(x) for x in pids.read_text().split()]
        assert len(children) == 2 and all(_alive(c) for c in children)
        time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(c) for c in children), "QEMU/virtiofsd survived their parent"
    finally:
        p.kill()
        p.wait()


def test_vm_from_short_lived_thread_survives_it_and_kill_stops_it(
    kernel: Kernel, init_disk: Path, tmp_path: Path
) -> None:
    """PDEATHSIG is per thread: children are forked from a keeper thread, not the caller's."""
    import threading

    require_binaries("qemu-system-x86_64")
    spec = _spec(kernel, init_disk, tmp_path / "run", cmdline_extra="hang")
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("h", QemuBackend().launch(spec)))
    t.start()
    t.join()
    h = box["h"]
    try:
        time.sleep(1.0)
        assert h.poll() is None and _alive(h.pid)
        assert h.wait(timeout=0.2) is None  # a hanging guest: wait times out
    finally:
        t0 = time.monotonic()
        h.kill()
    assert h.poll() is not None and time.monotonic() - t0 < 6
    h.kill()  # idempotent


def test_console_log_is_capped(kernel: Kernel, init_disk: Path, tmp_path: Path) -> None:
    """A guest flooding hvc0 (2 MiB) cannot grow console.log past console_limit; the tail survives."""
    require_binaries("qemu-system-x86_64")
    spec = _spec(
        kernel, init_disk, tmp_path / "run", cmdline_extra="flood", console_limit=64 * 1024
    )
    h = QemuBackend().launch(spec)
    try:
        assert h.wait(timeout=60) == 0
    finally:
        h.kill()
    data = spec.console_log.read_bytes()
    assert len(data) <= 64 * 1024
    assert data.startswith(b"[microvm: ") and b"bytes of console output dropped]" in data
    assert data.rstrip().endswith(b"FLOOD-END")


def test_console_sink_unit(tmp_path: Path) -> None:
    import socket

    from microvm.backends._console import ConsoleSink

    sink = ConsoleSink(tmp_path / "c.sock", tmp_path / "c.log", limit=8192)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(tmp_path / "c.sock"))
    for i in range(1000):
        c.sendall(f"line {i:04d}\n".encode())
    c.sendall(b"y" * 20000 + b"\nLAST\n")  # one chunk bigger than the limit
    c.close()
    sink._thread.join(5)
    sink.close()
    data = (tmp_path / "c.log").read_bytes()
    assert len(data) <= 8192 and data.endswith(b"\nLAST\n") and sink.dropped > 0
    assert data.startswith(f"[microvm: {sink.dropped} bytes".encode())
    with pytest.raises(ValueError, match="too small"):
        ConsoleSink(tmp_path / "d.sock", tmp_path / "d.log", limit=10)


def test_bad_microvm_accel_is_refused(monkeypatch) -> None:
    """MICROVM_ACCEL is tcg or kvm (any case, or unset); anything else is a one-line typed error."""
    monkeypatch.setenv("MICROVM_ACCEL", "bogus")
    with pytest.raises(BackendUnavailable, match=r"MICROVM_ACCEL='bogus' is not valid: use 'tcg' or 'kvm'"):
        kvm_usable()
    with pytest.raises(BackendUnavailable, match="MICROVM_ACCEL='bogus'"):
        QemuBackend(accel="tcg").check()
    monkeypatch.setenv("MICROVM_ACCEL", " TCG ")
    assert kvm_usable() is False and QemuBackend().resolved_accel() == "tcg"
    monkeypatch.setenv("MICROVM_ACCEL", "")
    QemuBackend(accel="tcg").check()


def test_kvm_probe_guest_is_sound_under_tcg() -> None:
    """The probe's one-instruction guest really runs and exits 99 (shown under TCG, which always works)."""
    from microvm.backends._qemu import _run_probe

    require_binaries("qemu-system-x86_64")
    assert _run_probe(QemuBackend().qemu_binary(), 60, accel="tcg") == (True, "", True)


def test_kvm_probe_is_cached_and_forced_kvm_fails_fast(monkeypatch, tmp_path: Path) -> None:
    """Probe once per boot and QEMU (cached under MICROVM_HOME); forced KVM that cannot run is refused."""
    from microvm.backends import _qemu as qemu_mod
    from microvm.backends._qemu import kvm_probe

    require_binaries("qemu-system-x86_64")
    monkeypatch.setenv("MICROVM_HOME", str(tmp_path / "home"))
    q = QemuBackend().qemu_binary()
    first = kvm_probe(q, refresh=True)
    assert not first.cached and (tmp_path / "home" / "cache" / "kvm-probe.json").is_file()
    monkeypatch.setattr(qemu_mod, "_PROBE_MEMO", {})  # as a new process: read from the file
    second = kvm_probe(q)
    assert second.cached and (second.ok, second.reason) == (first.ok, first.reason)
    if not os.path.exists("/dev/kvm") or os.path.exists("/sys/module/kvm_pvm"):
        assert not first.ok and first.reason  # nested PVM / no KVM: the probe says why
    monkeypatch.setenv("MICROVM_ACCEL", "kvm")
    if first.ok:
        QemuBackend().check()
        assert QemuBackend().resolved_accel() == "kvm"
    else:
        with pytest.raises(BackendUnavailable, match="KVM cannot run a guest on this host"):
            QemuBackend().check()
        monkeypatch.delenv("MICROVM_ACCEL")
        assert QemuBackend().resolved_accel() == "tcg"  # auto falls back to TCG
