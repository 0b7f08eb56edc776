"""The agent as PID 1 in a real guest (QEMU TCG): overlay root + pivot, eth0 via ioctl,
virtio-fs share, CA install, zombie reaping, exec/fs over the virtio-serial port, shutdown.

One boot for the whole module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm.agent import AgentError, SyncAgentClient, agent_binary
from microvm.kernel import Kernel
from tests.support import require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PEM = "-----BEGIN CERTIFICATE-----\nMIIBguestTEST\n-----END CERTIFICATE-----\n"


def _net_sink(path: Path) -> socket.socket:
    """A frame sink standing in for the network gateway (QEMU connects to it)."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(str(path))
    ls.listen(1)

    def run() -> None:
        try:
            conn, _ = ls.accept()
            with conn:
                while conn.recv(65536):
                    pass
        except OSError:
            pass

    threading.Thread(target=run, daemon=True).start()
    return ls


@pytest.fixture(scope="module")
def guest(kernel: Kernel, busybox_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[SyncAgentClient, Path, Path]]:  # fmt: skip
    require_binaries("qemu-system-x86_64", "mkfs.erofs", "mkfs.ext4", "debugfs")
    from microvm import Machine, build_ext4
    from microvm.backends import Disk, Share

    d = tmp_path_factory.mktemp("guest")
    (d / "empty").mkdir()
    boot = build_ext4(d / "empty", d / "boot.img", agent=agent_binary(), free_mib=8)
    lower = d / "lower.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(lower), str(busybox_root)], check=True)
    (d / "upper-src").mkdir()
    upper = build_ext4(d / "upper-src", d / "upper.img", free_mib=32)
    share = d / "share"
    share.mkdir()
    (share / "hello.txt").write_text("from host\n")
    sink = _net_sink(d / "net.sock")
    config = {
        "hostname": "agent-e2e",
        "root": {
            "kind": "overlay",
            "lower": [{"device": "/dev/vdb", "fstype": "erofs"}],
            "upper": {
                "device": "/dev/vdc",
                "fstype": "ext4",
                "upperdir": "/upper",
                "workdir": "/work",
            },
        },
        "network": {
            "interface": "eth0",
            "mac": "02:00:00:00:00:02",
            "mtu": 1400,
            "ipv4": {
                "address": "172.16.0.2",
                "prefix_len": 30,
                "gateway": "172.16.0.1",
                "dns": ["172.16.0.1"],
            },
            "ipv6": {"address": "fd00::2", "prefix_len": 64, "gateway": "fd00::1"},
            "hosts": {"host.microvm.internal": "172.16.0.1"},
        },
        "ca_certs": [PEM],
        "env": {"E2E": "on"},
    }
    shares = [Share("data", share, readonly=True, guest_path="/mnt/data")] if _virtiofsd() else []
    m = Machine(
        "qemu",
        kernel=kernel,
        disks=[boot, Disk(lower, readonly=True), upper],
        memory=256,
        boot_timeout=90,
        net_socket=d / "net.sock",
        shares=shares,
        bootstrap=config,
    )
    try:
        m.start()
        yield m.agent, upper, share
        assert m.shutdown(exit_code=0) is not None, "VMM did not exit after the agent's shutdown"
    finally:
        m.kill()
        sink.close()


def _virtiofsd() -> bool:
    return any(
        os.path.exists(p) for p in ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")
    ) or bool(shutil.which("virtiofsd"))


def test_pid1_and_mounts(guest: tuple[SyncAgentClient, Path, Path]) -> None:
    c, _, _ = guest
    r = c.exec("sh", ["-c", "cat /proc/1/cmdline; echo; mount"])
    lines = r.stdout.decode()
    assert lines.startswith("/.microvm/agent")
    assert "overlay on / type overlay" in lines and "lowerdir=/.microvm/lower/0" in lines
    for fs in (
        "proc on /proc",
        "sysfs on /sys",
        "devtmpfs on /dev",
        "devpts on /dev/pts",
        "cgroup2 on /sys/fs/cgroup",
        "tmpfs on /tmp",
    ):
        assert fs in lines, fs
    assert c.exec("sh", ["-c", "echo $E2E"]).stdout == b"on\n"


def test_network_hostname_and_files(guest: tuple[SyncAgentClient, Path, Path]) -> None:
    c, _, _ = guest
    out = c.exec(
        "sh",
        [
            "-c",
            "hostname; ip addr show eth0; ip route; ip -6 route; cat /etc/resolv.conf /etc/hosts",
        ],
    ).stdout.decode()
    assert out.startswith("agent-e2e\n")
    assert "inet 172.16.0.2/30" in out and "mtu 1400" in out and "02:00:00:00:00:02" in out
    assert "inet6 fd00::2/64" in out
    assert "default via 172.16.0.1 dev eth0" in out and "default via fd00::1 dev eth0" in out
    assert "nameserver 172.16.0.1" in out
    assert "172.16.0.1\thost.microvm.internal" in out and "127.0.1.1\tagent-e2e" in out
    assert c.read_file("/etc/ssl/certs/ca-certificates.crt").decode().endswith(PEM)


def test_share_mounted(guest: tuple[SyncAgentClient, Path, Path]) -> None:
    if not _virtiofsd():
        pytest.skip("needs virtiofsd (Debian qemu-system-common)")
    c, _, _ = guest
    assert c.read_file("/mnt/data/hello.txt") == b"from host\n"
    r = c.exec("sh", ["-c", "echo x > /mnt/data/new"])
    assert r.exit_code != 0  # read-only share


def test_exec_fs_tty_signals_in_guest(guest: tuple[SyncAgentClient, Path, Path]) -> None:
    c, _, _ = guest
    r = c.exec("sh", ["-c", "echo out; echo err >&2; exit 7"])
    assert (r.exit_code, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    assert c.exec("cat", stdin=b"piped").stdout == b"piped"
    assert c.exec("sh", ["-c", "stty size"], tty=True, rows=33, cols=77).stdout == b"33 77\r\n"
    assert c.exec("id", ["-u"], user="nobody").stdout == b"65534\n"
    assert c.exec("sh", ["-c", "ulimit -n"], rlimits={"nofile": 77}).stdout == b"77\n"
    data = os.urandom(10 * 1024 * 1024)
    c.write_file("/root/big", data)
    assert c.read_file("/root/big") == data
    with pytest.raises(AgentError) as e:
        c.exec("sleep", ["60"], timeout=1)
    assert e.value.kind == "timeout"
    with pytest.raises(AgentError) as e:
        c.exec("/nope")
    assert e.value.kind == "not_found"


def test_orphans_are_reaped(guest: tuple[SyncAgentClient, Path, Path]) -> None:
    c, _, _ = guest
    c.exec("sh", ["-c", "(sleep 0.2 &) ; true"])
    time.sleep(1.0)
    ps = c.exec("ps", ["-o", "pid,stat,comm"]).stdout.decode()
    assert not [line for line in ps.splitlines()[1:] if line.split()[1].startswith("Z")], ps


def test_metrics_in_guest(guest: tuple[SyncAgentClient, Path, Path]) -> None:
    c, _, _ = guest
    m = c.metrics()
    assert 100 * 2**20 < m["memory"]["total"] <= 256 * 2**20
    assert "eth0" in m["net"] and m["uptime_ms"] > 0


def test_writes_land_in_the_upper_disk(guest: tuple[SyncAgentClient, Path, Path]) -> None:
    """Checked after the module's shutdown (sync) by the last test; here we write."""
    c, _, _ = guest
    c.write_file("/etc/marker", b"persisted\n")
    c.exec("sync")
    upper = guest[1]
    out = subprocess.run(
        ["debugfs", "-R", "cat /upper/etc/marker", str(upper)], capture_output=True, check=False
    )
    assert out.stdout == b"persisted\n", out.stderr


def test_host_reconnect_keeps_guest_processes(kernel: Kernel, busybox_root: Path, tmp_path: Path) -> None:
    """Closing the host side of the virtio-serial port and reconnecting: the agent notices,
    resets its framing, keeps the running process, and serves the new client; its
    shutdown ends the VMM with the requested exit code acked."""
    require_binaries("qemu-system-x86_64", "mkfs.ext4", "debugfs")
    from microvm import Machine, build_ext4

    img = build_ext4(busybox_root, tmp_path / "root.img", agent=agent_binary(), free_mib=16)
    m = Machine("qemu", kernel=kernel, disks=[img], memory=256, boot_timeout=90)
    try:
        m.start()
        first = m.agent
        proc = first.exec_stream("sh", ["-c", "sleep 2; echo done > /tmp/marker"])
        first.close()
        c = SyncAgentClient.connect_unix(m.agent_socket, timeout=10)
        try:
            assert c.hello().pid == 1
            assert c.exec("sh", ["-c", f"test -d /proc/{proc.pid} && echo alive"]).stdout == b"alive\n"
            deadline = time.monotonic() + 20
            while c.exec("test", ["-f", "/tmp/marker"]).exit_code != 0:
                assert time.monotonic() < deadline, "detached process did not finish"
                time.sleep(0.2)
            assert c.read_file("/tmp/marker") == b"done\n"
            # Gone longer than the agent's 2 s grace: the host session ends; a new one works.
            c.close()
            time.sleep(2.5)
            c = SyncAgentClient.connect_unix(m.agent_socket, timeout=10)
            c.hello()
            assert c.exec("echo", ["back"]).stdout == b"back\n"
            assert c.shutdown(exit_code=9) == 9
        finally:
            c.close()
        assert m.wait(30) is not None
    finally:
        m.kill()
