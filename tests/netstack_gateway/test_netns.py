"""netstack.gateway._netns: sockets and sysctls in a real network namespace (root)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from netstack.errors import UplinkError
from netstack.gateway._netns import NETNS_RUN_DIR, entered, socket_in, write_sysctls
from tests.support import require_binaries, require_root

ADDR = "198.51.100.77"
FORWARDING = Path("/proc/sys/net/ipv4/conf/lo/forwarding")


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    require_binaries("ip")
    name = f"nsx{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", f"{ADDR}/32", "dev", "lo"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _own_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_socket_lives_in_the_namespace(netns: str) -> None:
    before = _own_netns()
    with socket_in(netns, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ADDR, 0))          # the address exists only in the namespace
    assert _own_netns() == before
    with socket.socket() as host, pytest.raises(OSError):
        host.bind((ADDR, 0))


def test_sysctls_are_the_namespace_s_own(netns: str) -> None:
    host_value = FORWARDING.read_text().strip()
    write_sysctls(netns, {"net/ipv4/conf/lo/forwarding": 1})
    out = subprocess.run(["ip", "netns", "exec", netns, "cat",
                          "/proc/sys/net/ipv4/conf/lo/forwarding"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "1"
    assert FORWARDING.read_text().strip() == host_value
    with pytest.raises(UplinkError, match=r"cannot set sysctl net\.ipv4\.nope"):
        write_sysctls(netns, {"net/ipv4/nope": 1})


def test_threads_enter_at_once_and_each_returns_home(netns: str) -> None:
    home = _own_netns()
    seen: list[bool] = []
    barrier = threading.Barrier(4)

    def work() -> None:
        for _ in range(20):
            with entered(netns):
                seen.append(_own_netns() != home)
            seen.append(_own_netns() == home)
        barrier.wait(10)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    barrier.wait(10)
    for t in threads:
        t.join(10)
    assert len(seen) == 120 and all(seen)
    assert _own_netns() == home


def test_a_missing_namespace_is_never_created() -> None:
    require_root()
    name = f"nsmissing{os.getpid()}"
    with pytest.raises(UplinkError, match="does not exist"):
        socket_in(name, socket.AF_INET, socket.SOCK_DGRAM)
    assert not (NETNS_RUN_DIR / name).exists()
    with pytest.raises(UplinkError, match="name must be"):
        socket_in("a/b", socket.AF_INET, socket.SOCK_DGRAM)
