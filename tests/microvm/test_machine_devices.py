"""One guest with a network (netdev stream to a test gateway) and virtio-fs shares, configured by
the boot config; plus `microvm vm run` and host-kill hygiene for a whole Machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm import Machine, build_ext4
from microvm.agent import agent_binary
from microvm.backends import Share
from microvm.kernel import Kernel
from tests.microvm.netpeer import NetPeer
from tests.support import require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.timeout(120)]

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@pytest.fixture(scope="module")
def root_img(busybox_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_binaries("qemu-system-x86_64", "mkfs.ext4")
    return build_ext4(
        busybox_root, tmp_path_factory.mktemp("dev") / "root.img", agent=agent_binary()
    )


@pytest.fixture(scope="module")
def world(
    kernel: Kernel, root_img: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    require_binaries(VIRTIOFSD)
    d = tmp_path_factory.mktemp("world")
    rw, ro = d / "rw", d / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "motd").write_text("read-only hello\n")
    peer = NetPeer(d / "net.sock")
    m = Machine(
        "qemu", kernel=kernel, disks=[root_img], memory=384, net_socket=d / "net.sock",
        shares=[Share("work", rw), Share("docs", ro, readonly=True, guest_path="/srv/docs")],
        mac="02:00:00:00:00:02",
        bootstrap={"network": {
            "interface": "eth0", "mac": "02:00:00:00:00:02", "mtu": 1500,
            "ipv4": {"address": "172.16.0.2", "prefix_len": 30, "gateway": "172.16.0.1",
                     "dns": ["172.16.0.1"]},
            "hosts": {"host.microvm.internal": "172.16.0.1"},
        }},
    )  # fmt: skip
    m.start()
    yield {"m": m, "peer": peer, "rw": rw, "ro": ro}
    m.shutdown()
    peer.close()


def test_guest_network_reaches_gateway(world: dict) -> None:
    m, peer = world["m"], world["peer"]
    r = m.agent.exec(
        "/bin/sh", ["-c", "ip -4 addr show eth0; ping -c 2 -W 3 host.microvm.internal"]
    )
    assert r.exit_code == 0, r.stdout + r.stderr
    assert b"172.16.0.2/30" in r.stdout
    assert peer.arp_replies >= 1 and peer.echo_replies >= 2
    assert m.agent.read_file("/etc/resolv.conf").strip().endswith(b"172.16.0.1")


def test_shares_mounted_rw_and_ro(world: dict) -> None:
    m, rw = world["m"], world["rw"]
    assert m.agent.read_file("/srv/docs/motd") == b"read-only hello\n"
    r = m.agent.exec("/bin/sh", ["-c", "echo from-guest > /mnt/work/out.txt && cat /proc/mounts"])
    assert r.exit_code == 0, r.stderr
    assert (rw / "out.txt").read_text() == "from-guest\n"
    denied = m.agent.exec("/bin/sh", ["-c", "echo x > /srv/docs/new"])
    assert denied.exit_code != 0
    assert not (world["ro"] / "new").exists()


def test_vm_run_cli(kernel: Kernel, busybox_root: Path, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "in.txt").write_text("from host\n")
    r = subprocess.run(
        [sys.executable, "-m", "microvm.cli", "vm", "run", "--rootfs-dir", str(busybox_root),
         "--memory", "256", "--env", "WHO=cli", "--volume", f"{vol}:/data", "--",
         "/bin/sh", "-c", "echo hi $WHO; cat /data/in.txt; echo out > /data/out.txt; echo oops >&2; exit 3"],
        capture_output=True, timeout=90,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"hi cli\nfrom host\n" and b"oops" in r.stderr
    assert (vol / "out.txt").read_text() == "out\n"


def test_vm_run_cli_bad_args() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "microvm.cli", "vm", "run", "--rootfs-dir", "/nonexistent", "--", "true"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "/nonexistent" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "microvm.cli", "vm", "run", "--rootfs-dir", "/", "--cpus", "0", "--", "true"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "--cpus" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "microvm.cli", "vm", "run", "--rootfs-dir", "/", "--volume", "/tmp", "--", "true"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "HOST_DIR:GUEST_PATH" in r.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_killing_host_process_leaves_nothing(
    kernel: Kernel, root_img: Path, tmp_path: Path
) -> None:
    """SIGKILL a process that booted a Machine with a share: no QEMU or virtiofsd survives."""
    require_binaries(VIRTIOFSD)
    (tmp_path / "s").mkdir()
    own = tmp_path / "own.img"  # a writable disk is locked by its QEMU: use a private copy
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(root_img), str(own)], check=True)
    pids = tmp_path / "pids"
    run = tmp_path / "run"  # SIGKILL skips the Machine's cleanup: keep its rundir where we remove it
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from microvm import Machine
        from microvm.backends import Share
        m = Machine("qemu", disks=[Path({str(own)!r})], memory=256,
                    rundir=Path({str(run)!r}),
                    shares=[Share("s", Path({str(tmp_path / "s")!r}))]).start()
        m.agent.exec("/bin/true")
        Path({str(pids)!r}).write_text(" ".join(map(str, m.handle.helper_pids)))
        time.sleep(600)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and pids.read_text()):
            assert time.monotonic() < deadline and p.poll() is None, "child did not boot"
            time.sleep(0.05)
        children = [int(x) for x in pids.read_text().split()]
        assert len(children) == 2 and all(_alive(c) for c in children)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(c) for c in children)
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(run, ignore_errors=True)
        own.unlink(missing_ok=True)


def test_vm_run_cli_libkrun_unavailable(busybox_root: Path) -> None:
    env = {**os.environ, "MICROVM_LIBKRUN": "/nonexistent/libkrun.so.1"}
    r = subprocess.run(
        [sys.executable, "-m", "microvm.cli", "vm", "run", "--rootfs-dir", str(busybox_root),
         "--backend", "libkrun", "--", "/bin/true"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 125
    assert "BackendUnavailable" in r.stderr and "Fedora" in r.stderr and "macOS" in r.stderr


@pytest.mark.parametrize("trap", [False, True])
def test_vm_run_ctrl_c(busybox_root: Path, trap: bool) -> None:
    """Ctrl-C reaches the guest command (exit 130); if it ignores SIGINT, a second Ctrl-C kills the VM."""
    script = ("trap '' INT; " if trap else "") + "echo ready; sleep 30; echo never"
    p = subprocess.Popen(
        [sys.executable, "-m", "microvm.cli", "vm", "run", "--rootfs-dir", str(busybox_root),
         "--memory", "256", "--", "/bin/sh", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        if trap:
            time.sleep(1.0)
            assert p.poll() is None  # the guest ignored it; still running
            p.send_signal(signal.SIGINT)
        out, _err = p.communicate(timeout=30)
        assert p.returncode == 130 and b"never" not in out
        assert time.monotonic() - t < 25
    finally:
        p.kill()
        p.wait()
