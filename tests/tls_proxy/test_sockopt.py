"""``SO_ORIGINAL_DST``: the one table of cases, run through both private copies.

The layering rule keeps ``netstack`` and ``tls_proxy`` from importing each other, so each
has its own ``_sockopt.py``; they must stay the same file, and both must give the same
answer for real redirected connections: an nftables ``redirect`` (output hook) in a test
network namespace, to an IPv4 listener, an IPv6 listener, and a dual-stack IPv6 listener
accepting an IPv4 connection (local address ``::ffff:127.0.0.1``: the conntrack entry is
IPv4); a connection that was not redirected (conntrack still tracks it: its own
destination); and a socket conntrack knows nothing of (a Unix socket).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import netstack.gateway._sockopt as ns_sockopt
import tls_proxy._sockopt as tp_sockopt
from netstack.gateway._netns import socket_in
from tests.support import require_binaries, require_root

ROOT = Path(__file__).resolve().parents[2]
IMPLS: dict[str, Callable[[socket.socket], tuple[str, int]]] = {
    "netstack": ns_sockopt.original_dst, "tls_proxy": tp_sockopt.original_dst}

VIP4, VIP6 = "203.0.113.10", "2001:db8::10"
LISTEN_PORT = 9053


@dataclass(frozen=True)
class Case:
    """A listener (family, address, v6only) and where the client connects."""

    listen_family: socket.AddressFamily
    listen_host: str
    v6only: bool
    connect_family: socket.AddressFamily
    connect_to: tuple[str, int]
    #: what SO_ORIGINAL_DST must say (a tracked connection that was not NATed: its own
    #: destination); None: no conntrack record (OSError)
    expected: tuple[str, int] | None


CASES = {
    "ipv4": Case(socket.AF_INET, "127.0.0.1", False, socket.AF_INET, (VIP4, 80),
                 (VIP4, 80)),
    "ipv6": Case(socket.AF_INET6, "::1", True, socket.AF_INET6, (VIP6, 443), (VIP6, 443)),
    "v4-mapped": Case(socket.AF_INET6, "::", False, socket.AF_INET, (VIP4, 81), (VIP4, 81)),
    "ipv4-not-redirected": Case(socket.AF_INET, "127.0.0.1", False, socket.AF_INET,
                                ("127.0.0.1", LISTEN_PORT), ("127.0.0.1", LISTEN_PORT)),
    "ipv6-not-redirected": Case(socket.AF_INET6, "::1", True, socket.AF_INET6,
                                ("::1", LISTEN_PORT), ("::1", LISTEN_PORT)),
}

RULES = f"""table inet sockopt_test {{
  chain out {{ type nat hook output priority -100; policy accept;
    ip daddr {VIP4} tcp dport {{ 80, 81 }} redirect to :{LISTEN_PORT}
    ip6 daddr {VIP6} tcp dport 443 redirect to :{LISTEN_PORT}
  }}
}}
"""


def test_the_two_copies_are_the_same_file() -> None:
    a = (ROOT / "netstack" / "gateway" / "_sockopt.py").read_text(encoding="utf-8")
    b = (ROOT / "tls_proxy" / "_sockopt.py").read_text(encoding="utf-8")
    assert a == b


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A network namespace with the test addresses on ``lo`` and the redirect rules."""
    require_root()
    require_binaries("ip", "nft")
    name = f"sockopt{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        nsx = ["ip", "netns", "exec", name]
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{VIP4}/32", "dev", "lo"],
                    ["ip", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad"]):
            subprocess.run([*nsx, *cmd], check=True)
        subprocess.run([*nsx, "nft", "-f", "-"], input=RULES, text=True, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _in_netns(name: str, family: socket.AddressFamily) -> socket.socket:
    return socket_in(name, family, socket.SOCK_STREAM)


def _accepted(netns: str, case: Case) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, client, accepted) for one case, all in the test namespace."""
    srv = _in_netns(netns, case.listen_family)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if case.listen_family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(case.v6only))
        srv.bind((case.listen_host, LISTEN_PORT))
        srv.listen(4)
        srv.settimeout(5)
        client = _in_netns(netns, case.connect_family)
        client.settimeout(5)
        client.connect(case.connect_to)
        conn, _ = srv.accept()
    except BaseException:
        srv.close()
        raise
    return srv, client, conn


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_original_dst_of_real_redirected_sockets(netns: str, case: str, impl: str) -> None:
    c = CASES[case]
    srv, client, conn = _accepted(netns, c)
    try:
        if case == "v4-mapped":  # the premise of the case: an IPv4 flow on an IPv6 socket
            assert conn.family == socket.AF_INET6
            assert conn.getsockname()[0] == "::ffff:127.0.0.1"
        if c.expected is None:
            with pytest.raises(OSError):
                IMPLS[impl](conn)
        else:
            assert IMPLS[impl](conn) == c.expected
    finally:
        for s in (conn, client, srv):
            s.close()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_non_ip_sockets_have_no_original_destination(impl: str) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(OSError):
        IMPLS[impl](a)


def test_public_wrappers_agree() -> None:
    """``tls_proxy.original_dst`` raises, netstack's ``original_destination`` says None."""
    from netstack.gateway._dns_forwarder import original_destination
    from tls_proxy import original_dst

    a, b = socket.socketpair()
    with a, b:
        assert original_destination(a) is None
        with pytest.raises(OSError):
            original_dst(a)
