"""LibkrunBackend + launcher against the libkrun test double (a C library recording every call).

The double plays a guest in ``krun_start_enter``: it writes a banner to the console port and echoes
the ``agent`` port until it reads ``exit N``, then ``_exit(N)`` like libkrun does.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from microvm.backends import Disk, Share, VmSpec, console_tail, kvm_usable
from microvm.backends._libkrun import COMPAT_NET_FEATURES, KrunError, Libkrun, LibkrunBackend
from microvm.errors import BackendUnavailable


@pytest.fixture
def calls_log(tmp_path: Path, monkeypatch) -> Path:
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("KRUN_DOUBLE_LOG", str(log))
    monkeypatch.delenv("KRUN_DOUBLE_FAIL", raising=False)
    return log


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _spec(tmp_path: Path, **kw) -> VmSpec:
    disks = []
    for name in ("root.img", "layer.img"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    disks = [Disk(tmp_path / "root.img"), Disk(tmp_path / "layer.img", readonly=True)]
    return VmSpec(kernel=tmp_path / "unused.elf", disks=disks, rundir=tmp_path / "run", **kw)


def _connect(path: Path, timeout: float = 10) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_launcher_call_sequence_ports_and_exit_code(
    krun_double: Path, calls_log: Path, tmp_path: Path
) -> None:
    share = tmp_path / "sh"
    share.mkdir()
    spec = _spec(
        tmp_path, cpus=2, memory_mib=640, net_socket=tmp_path / "net.sock",
        mac="02:11:22:33:44:55", shares=[Share("vol", share)],
    )  # fmt: skip
    vm = LibkrunBackend(library=str(krun_double), require_kvm=False).launch(spec)
    try:
        s = _connect(spec.agent_socket)
        s.sendall(b"ping\n")
        assert s.recv(100) == b"ping\n"  # bytes reach the guest port and come back
        s.sendall(b"exit 7\n")
        assert vm.wait(timeout=20) == 7  # the guest's exit code is the launcher's status
    finally:
        vm.kill()
    calls = _calls(calls_log)
    names = [c["fn"] for c in calls]
    assert names == [
        "krun_set_log_level", "krun_create_ctx", "krun_set_vm_config", "krun_set_root",
        "krun_add_disk", "krun_add_disk", "krun_set_root_disk_remount", "krun_add_virtiofs",
        "krun_add_net_unixstream", "krun_disable_implicit_vsock", "krun_disable_implicit_console",
        "krun_add_virtio_console_multiport", "krun_add_console_port_inout",
        "krun_add_console_port_inout", "krun_set_kernel_console", "krun_set_exec", "krun_start_enter",
    ]  # fmt: skip
    by = {}
    for c in calls:
        by.setdefault(c["fn"], []).append(c["args"])
    ctx = 1  # the double's first context id
    assert by["krun_set_vm_config"] == [[ctx, 2, 640]]
    assert by["krun_add_disk"] == [
        [ctx, "vda", str(tmp_path / "root.img"), False],
        [ctx, "vdb", str(tmp_path / "layer.img"), True],
    ]
    assert by["krun_set_root_disk_remount"] == [[ctx, "/dev/vda", None, None]]
    assert by["krun_add_virtiofs"] == [[ctx, "vol", str(share)]]
    assert by["krun_add_net_unixstream"] == [
        [ctx, str(tmp_path / "net.sock"), -1, "02:11:22:33:44:55", COMPAT_NET_FEATURES, 0]
    ]
    console, agent = by["krun_add_console_port_inout"]
    assert console == [ctx, 7, "console", "chr", "sock"]  # /dev/null in, capped console sink out
    assert agent == [ctx, 7, "agent", "sock", "sock"]  # socketpair bridged to agent.sock
    assert by["krun_set_kernel_console"] == [[ctx, "hvc0"]]
    # NULL-terminated arrays arrive intact: empty argv, one env entry
    assert by["krun_set_exec"] == [[ctx, "/.microvm/agent", [], ["KRUN_INIT_PID1=1"]]]
    assert "krun-double: guest up" in console_tail(spec.console_log)


def test_launcher_reports_failing_call(
    krun_double: Path, calls_log: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KRUN_DOUBLE_FAIL", "krun_add_disk=22")
    spec = _spec(tmp_path)
    vm = LibkrunBackend(library=str(krun_double), require_kvm=False).launch(spec)
    assert vm.wait(timeout=20) == 125
    log = (spec.rundir / "launcher.log").read_text()
    err = json.loads(log.strip().splitlines()[-1])
    assert err["type"] == "KrunError" and "krun_add_disk failed: -22 (EINVAL" in err["error"]
    names = [c["fn"] for c in _calls(calls_log)]
    assert "krun_start_enter" not in names and names[-1] == "krun_add_disk"


def test_bindings_convert_and_raise(krun_double: Path, calls_log: Path) -> None:
    krun = Libkrun.open(str(krun_double))
    ctx = krun.create_ctx()
    assert krun.call("krun_set_rlimits", ctx, ["7=1024:2048", "6=10:10"]) == 0
    assert krun.call("krun_set_env", ctx, []) == 0
    assert krun.call("krun_add_net_tap", ctx, "tap0", bytes.fromhex("020000000009"), 0, 0) == 0
    assert krun.call("krun_free_ctx", ctx) == 0
    with pytest.raises(KrunError) as ei:
        krun.call("krun_set_vm_config", ctx, 0, 512)
    assert ei.value.errno == 22 and ei.value.function == "krun_set_vm_config"
    with pytest.raises(Exception, match="NUL byte"):
        krun.call("krun_set_workdir", ctx, "a\x00b")
    last = _calls(calls_log)
    assert last[1]["args"] == [ctx, ["7=1024:2048", "6=10:10"]]
    assert last[2]["args"] == [ctx, []]
    assert last[3]["args"] == [ctx, "tap0", "02:00:00:00:00:09", 0, 0]
    assert last[4] == {"fn": "krun_free_ctx", "args": [ctx], "rc": 0}


def test_feature_probing(krun_double: Path, krun_double_noblk: Path, monkeypatch) -> None:
    monkeypatch.setenv("KRUN_DOUBLE_FEATURES", "1")
    krun = Libkrun.open(str(krun_double))
    assert krun.has_feature("blk") and not krun.has_feature("net")
    with pytest.raises(Exception, match="unknown libkrun feature 'warp'"):
        krun.has_feature("warp")
    nb = Libkrun.open(str(krun_double_noblk))
    assert not nb.has_symbol("krun_add_disk") and nb.has_symbol("krun_create_ctx")
    with pytest.raises(BackendUnavailable, match="lacks krun_add_disk"):
        nb.call("krun_add_disk", 1, "vda", "/x", False)
    with pytest.raises(BackendUnavailable, match="block devices"):
        LibkrunBackend(library=str(krun_double_noblk), require_kvm=False).check()


def test_missing_libkrun_has_install_hints(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MICROVM_LIBKRUN", str(tmp_path / "nope.so"))
    with pytest.raises(BackendUnavailable) as ei:
        LibkrunBackend().check()
    msg = str(ei.value)
    assert "Fedora" in msg and "Debian/Ubuntu" in msg and "macOS" in msg


def test_kvm_required_without_real_kvm(krun_double: Path, monkeypatch) -> None:
    monkeypatch.setenv("MICROVM_ACCEL", "tcg")
    with pytest.raises(BackendUnavailable, match="real KVM"):
        LibkrunBackend(library=str(krun_double)).check()


def _real_libkrun() -> str | None:
    try:
        return Libkrun.open().path
    except BackendUnavailable:
        return None


@pytest.mark.vm
@pytest.mark.skipif(
    not kvm_usable() or _real_libkrun() is None,
    reason="needs libkrun.so.1 and real KVM (vmx/svm, not nested PVM)",
)
def test_real_libkrun_boot(kernel, init_disk: Path, tmp_path: Path) -> None:
    spec = VmSpec(kernel=kernel.elf, disks=[Disk(init_disk)], rundir=tmp_path / "run",
                  memory_mib=256, kernel_library=kernel.library)  # fmt: skip
    vm = LibkrunBackend().launch(spec)
    try:
        assert vm.wait(timeout=60) is not None
    finally:
        vm.kill()
    assert "GUEST-INIT-UP" in console_tail(spec.console_log)


def test_start_enter_failure_is_reported(
    krun_double: Path, calls_log: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("KRUN_DOUBLE_FAIL", "krun_start_enter=2")
    spec = _spec(tmp_path)
    vm = LibkrunBackend(library=str(krun_double), require_kvm=False).launch(spec)
    assert vm.wait(timeout=20) == 125
    err = json.loads((spec.rundir / "launcher.log").read_text().strip().splitlines()[-1])
    assert "krun_start_enter failed: -2 (ENOENT" in err["error"]


def test_machine_on_libkrun_double_fails_boot_cleanly(
    krun_double: Path, calls_log: Path, tmp_path: Path
) -> None:
    """Machine is backend-agnostic: a 'guest' that only echoes never says core.ready -> BootError."""
    from microvm import BootError, Machine

    (tmp_path / "root.img").write_bytes(b"\0" * 4096)
    m = Machine(LibkrunBackend(library=str(krun_double), require_kvm=False), kernel=tmp_path / "k.elf",
                disks=[tmp_path / "root.img"], boot_timeout=5)  # fmt: skip
    with pytest.raises(BootError) as ei:
        m.start()
    assert "krun-double: guest up" in ei.value.console_tail
    assert m.handle.poll() is not None


def test_agent_bridge_reconnect_loses_nothing(
    krun_double: Path, calls_log: Path, tmp_path: Path
) -> None:
    """A second host client after the first disconnects gets every reply (no stale reader steals it)."""
    spec = _spec(tmp_path)
    vm = LibkrunBackend(library=str(krun_double), require_kvm=False).launch(spec)
    try:
        for i in range(3):
            s = _connect(spec.agent_socket)
            s.sendall(f"hello {i}\n".encode())
            got = b""
            while not got.endswith(b"\n"):
                got += s.recv(100)
            assert got == f"hello {i}\n".encode()
            s.close()
            time.sleep(0.1)
        s = _connect(spec.agent_socket)
        s.sendall(b"exit 3\n")
        assert vm.wait(timeout=20) == 3
    finally:
        vm.kill()
