"""IP fragments through the gateway: replies of allowed flows that reach it as fragments
are delivered, crafted fragments are not (netstack/csrc/frag.c).

The loop tests (no root) write frames straight into the C loop's uplink and guest sides
(socketpairs; see test_gateway_loop.py). The end-to-end tests (root) run real kernels:
the guest namespace pings and talks UDP to a server in the upstream namespace whose
answers are larger than the uplink's MTU (1500), so they come back as fragments.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netstack import NetworkPolicy, build_frame
from netstack.gateway import AddressPlan, Gateway, TapUplink
from tests.netstack_fastpath._frags import frag4, frag6, fragment4, fragment6
from tests.netstack_gateway.test_gateway_loop import GUEST, REMOTE, loop
from tests.netstack_gateway.topology import (
    UPSTREAM_DNS_IP,
    UPSTREAM_IP,
    Topology,
    uplink_and_topology,
)
from tests.support import require_binaries, require_root

pytestmark = pytest.mark.timeout(60)
GUEST6, REMOTE6 = "fd42:6d73:62::2", "2001:db8::10"


def _udp(src: str, dst: str, sport: int, dport: int, n: int) -> bytes:
    return build_frame(src, dst, "udp", sport, dport, bytes(range(256)) * (n // 256) + bytes(
        n % 256))


# -- the C loop on socketpairs (no root) ----------------------------------------------------
def test_fragmented_replies_reach_the_guest_and_crafted_fragments_do_not() -> None:
    with loop(NetworkPolicy.public_only(), mode="dgram") as lp:
        query = build_frame(GUEST, REMOTE, "udp", 5000, 7007, b"q")
        lp.send(query)
        assert lp.recv_uplink() == query
        answer = fragment4(_udp(REMOTE, GUEST, 7007, 5000, 4000), [1480, 1480], ident=77)
        for f in answer:
            lp.uplink.send(f)
        assert [lp.recv_guest() for _ in answer] == answer
        # a later fragment whose first fragment never came, one overlapping its first
        # fragment, a tiny first fragment (no room for the ports) and its rest
        stray = frag4(REMOTE, GUEST, 17, 78, 1480, False, bytes(200))
        overlap = frag4(REMOTE, GUEST, 17, 77, 8, False, bytes(200))
        tiny = frag4(REMOTE, GUEST, 17, 79, 0, True, b"\x1b\x5f\x13")
        rest = frag4(REMOTE, GUEST, 17, 79, 8, False, bytes(200))
        for f in (stray, overlap, tiny, rest):
            lp.uplink.send(f)
        assert lp.counter("not_reply", 4) == 4
        lp.guest.settimeout(0.3)
        with pytest.raises(TimeoutError):
            lp.guest.recv(70000)
        st = lp.classifier.stats()
        assert (st.fragments_followed, st.fragments_unmatched, st.fragments_bad) == (2, 2, 1)


def test_a_guest_sending_fragments_and_a_stray_fragment_from_the_guest() -> None:
    """A guest whose link MTU is 1500 fragments its large UDP datagrams itself."""
    with loop(NetworkPolicy.public_only(), mode="dgram") as lp:
        frags = fragment4(_udp(GUEST, REMOTE, 5000, 7007, 4000), [1480, 1480], ident=5)
        for f in frags:
            lp.send(f)
        assert [lp.recv_uplink() for _ in frags] == frags
        lp.send(frag4(GUEST, REMOTE, 17, 6, 1480, False, bytes(100)))  # no first fragment
        # a denied datagram (private address): an ICMP error for the first fragment only
        denied = fragment4(_udp(GUEST, "10.9.9.9", 5000, 7007, 3000), [1480], ident=7)
        for f in denied:
            lp.send(f)
        icmp = lp.recv_guest()
        assert icmp[23] == 1 and icmp[34:36] == b"\x03\x03"
        assert lp.no_uplink(0.2)
        assert lp.counter("icmp_sent", 1) == 1
        assert lp.classifier.stats().fragments_unmatched == 2


def test_a_published_udp_port_takes_fragmented_datagrams_both_ways() -> None:
    """A datagram to a published UDP port cut by the uplink's MTU (the TAP uplink's
    namespace fragments what the port publisher sends) reaches the guest whole, and the
    guest's fragmented answer leaves; an ingress deny rule stops the first fragment, and
    with it the rest."""
    from tests.netstack_gateway.test_gateway_loop import GW

    allow = NetworkPolicy.custom(default_egress="deny", default_ingress="allow")
    deny = NetworkPolicy.custom(default_egress="deny", default_ingress="deny")
    for policy, admitted in ((allow, True), (deny, False)):
        with loop(policy, udp_published=(5300,)) as lp:
            ask = fragment4(_udp(GW, GUEST, 40000, 5300, 3000), [1480, 1480], ident=77)
            for piece in ask:
                lp.uplink.send(piece)
            if not admitted:
                time.sleep(0.2)
                assert lp.counter("not_reply", 3) == 3
                continue
            assert [lp.recv_guest() for _ in ask] == ask
            answer = fragment4(_udp(GUEST, GW, 5300, 40000, 3000), [1480, 1480], ident=78)
            for piece in answer:
                lp.send(piece)
            assert [lp.recv_uplink() for _ in answer] == answer


def test_fragmented_ping_and_ipv6_replies() -> None:
    with loop(NetworkPolicy.allow_all(), mode="dgram") as lp:
        ping = build_frame(GUEST, REMOTE, "icmpv4", payload=bytes(1000))
        lp.send(ping)
        assert lp.recv_uplink() == ping
        pong = fragment4(build_frame(REMOTE, GUEST, "icmpv4", payload=bytes(3000),
                                     icmp_type=0), [1480, 1480], ident=9)
        for f in pong:
            lp.uplink.send(f)
        assert [lp.recv_guest() for _ in pong] == pong
        q6 = build_frame(GUEST6, REMOTE6, "udp", 5000, 7007, b"q")
        lp.send(q6)
        assert lp.recv_uplink() == q6
        a6 = fragment6(_udp(REMOTE6, GUEST6, 7007, 5000, 3000), [1448, 1448], ident=0xABCD)
        stray6 = frag6(REMOTE6, GUEST6, 17, 0xABCE, 1448, False, bytes(64))
        for f in (*a6, stray6):
            lp.uplink.send(f)
        assert [lp.recv_guest() for _ in a6] == a6
        assert lp.counter("not_reply", 1) == 1


# -- end to end (root): real kernels on both ends -------------------------------------------
_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    # a small query gets 4000 bytes back; a large datagram gets its length
    s.sendto(b"a" * 4000 if len(data) < 100 else b"got %d" % len(data), peer)
"""

_CLIENT = r"""
import socket, sys
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
for _ in range(3):
    s.send(b"x" * int(sys.argv[3]))
    try:
        data = s.recv(65535)
    except TimeoutError:
        continue
    print(len(data), data[:16].decode())
    break
else:
    print("timeout")
"""

ECHO_PORT = 7007


class Rig:
    def __init__(self, topo: Topology, uplink: TapUplink) -> None:
        self.topo, self.uplink = topo, uplink

    def gateway(self, policy: NetworkPolicy) -> Gateway:
        assert self.topo.vmm_socket is not None
        return Gateway(policy, uplink=self.uplink, guest_fd=self.topo.vmm_socket.fileno(),
                       dns_upstreams=[UPSTREAM_DNS_IP])

    def run(self, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return self.topo.run_in_guest(argv, timeout=timeout)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_root()
    require_binaries("ip", "nft", "ping")
    tmp: Path = tmp_path_factory.mktemp("gwfrag")
    with uplink_and_topology("gw-frag", AddressPlan(3250), tmp, "f",
                             vnet_hdr=True) as (uplink, topo):
        assert isinstance(uplink, TapUplink)
        echo = subprocess.Popen(["ip", "netns", "exec", topo.upstream_ns, sys.executable, "-c",
                                 _ECHO, UPSTREAM_IP, str(ECHO_PORT)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
            yield Rig(topo, uplink)
        finally:
            echo.kill()
            echo.wait(10)
            if echo.stdout is not None:
                echo.stdout.close()


def test_ping_without_df_larger_than_the_uplink_gets_its_fragmented_replies(rig: Rig) -> None:
    with rig.gateway(NetworkPolicy.public_only()) as gw:
        r = rig.run(["ping", "-c", "2", "-i", "0.3", "-W", "3", "-M", "dont", "-s", "3000",
                     UPSTREAM_IP])
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        assert gw.stats()["fragmented"] >= 2
        cs = gw.classifier.stats()  # (not_reply may count a neighbour probe of the uplink)
        assert cs.fragments_followed >= 2 and cs.fragments_unmatched == cs.fragments_bad == 0


def test_a_large_udp_answer_arrives_fragmented_and_is_delivered(rig: Rig) -> None:
    with rig.gateway(NetworkPolicy.public_only()) as gw:
        r = rig.run([sys.executable, "-c", _CLIENT, UPSTREAM_IP, str(ECHO_PORT), "10"])
        assert r.stdout.split()[:2] == ["4000", "aaaaaaaaaaaaaaaa"], r.stdout + r.stderr
        cs = gw.classifier.stats()
        assert cs.fragments_recorded >= 1 and cs.fragments_followed >= 2, cs
        assert cs.fragments_unmatched == cs.fragments_bad == 0, cs


def test_a_guest_with_a_1500_link_sends_fragments_that_arrive_whole(rig: Rig) -> None:
    rig.run(["ip", "link", "set", "dev", "eth0", "mtu", "1500"])
    try:
        with rig.gateway(NetworkPolicy.public_only()) as gw:
            r = rig.run([sys.executable, "-c", _CLIENT, UPSTREAM_IP, str(ECHO_PORT), "4000"])
            assert r.stdout.split() == ["8", "got", "4000"], r.stdout + r.stderr
            stats = gw.stats()
            assert stats["fragmented"] == 0 and stats["verdicts"]["allow"] >= 3, stats
            assert gw.classifier.stats().fragments_followed >= 2
    finally:
        rig.run(["ip", "link", "set", "dev", "eth0", "mtu", str(rig.topo.plan.mtu)])
        rig.run(["ip", "route", "flush", "cache"])
