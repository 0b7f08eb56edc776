"""PortPublisher on the host's loopback: real sockets, no root.

The "guest" is a server on 127.0.0.1 and the socket factory is ``socket.socket`` (the
host's namespace stands in for the uplink's). The TAP-uplink path (a socket from
``TapUplink.socket``, a guest behind the C gateway loop) is covered end to end by
``test_gateway_e2e.py::test_published_*``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from netstack import Decision, Flow, NetworkPolicy, Rule
from netstack.errors import GatewayError
from netstack.gateway import PublishedPort
from netstack.gateway._published import STAT_KEYS, PortPublisher

pytestmark = pytest.mark.timeout(60)
ALLOW = NetworkPolicy.allow_all().evaluate


def wait_for(cond: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll until ``cond()`` holds (an eventual state, not a timing assert)."""
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class EchoServer:
    """A TCP echo "guest" on 127.0.0.1 (one thread per connection); counts what it saw."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.srv.getsockname()[1])
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    @property
    def seen(self) -> int:
        with self.lock:
            return len(self.conns)

    def close(self) -> None:
        self.srv.close()
        with self.lock:
            for c in self.conns:
                c.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def udp_echo() -> Iterator[int]:
    """A UDP "guest" on 127.0.0.1 that answers ``echo <data>``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            sock.sendto(b"echo " + data, addr)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        t.join(5)
        sock.close()


def publisher(guest_port: int, check: Callable[[Flow], Decision] = ALLOW,
              protocol: str = "tcp", **kw: float) -> PortPublisher:
    return PortPublisher(socket.socket, "127.0.0.1",
                         [PublishedPort(0, guest_port, protocol)], check, **kw)  # type: ignore[arg-type]


def assert_reset(port: int, source: str = "127.0.0.1") -> None:
    """A connection to ``port`` is refused with a RST (on loopback it may come before
    connect() returns)."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(10)
        with pytest.raises(ConnectionResetError):
            s.connect(("127.0.0.1", port))
            s.sendall(b"x")
            s.recv(10)


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)   # half-close: the echo still answers
        out = b""
        while data := c.recv(65536):
            out += data
        return out


def test_tcp_relay_with_half_close_and_large_payload(echo: EchoServer) -> None:
    with publisher(echo.port) as pub:
        port = pub.ports[echo.port]
        payload = bytes(range(256)) * 8192   # 2 MiB: both directions under backpressure
        assert roundtrip(port, payload) == payload
        assert roundtrip(port, b"small") == b"small"
        wait_for(lambda: pub.stats["accepted"] == 2)
        assert pub.stats == {**dict.fromkeys(STAT_KEYS, 0), "accepted": 2}


def test_denied_connection_is_reset_and_never_reaches_the_guest(echo: EchoServer) -> None:
    policy = NetworkPolicy.custom(rules=[Rule.deny(direction="ingress", protocol="tcp",
                                                   port=echo.port)])
    with publisher(echo.port, policy.evaluate) as pub:
        assert_reset(pub.ports[echo.port])
        assert pub.stats["denied"] == 1 and pub.stats["accepted"] == 0
        assert echo.seen == 0


def test_a_broken_check_denies() -> None:
    def broken(flow: Flow) -> Decision:
        raise RuntimeError("boom")

    with publisher(9, broken) as pub:
        assert_reset(pub.ports[9])
        assert pub.stats["denied"] == 1


def test_unreachable_guest_is_failed_and_reset() -> None:
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = int(s.getsockname()[1])
    with publisher(dead) as pub:
        assert_reset(pub.ports[dead])
        assert pub.stats["failed"] == 1


def test_connections_beyond_the_bound_wait_in_the_backlog(echo: EchoServer) -> None:
    with publisher(echo.port, max_connections=2) as pub:
        port = pub.ports[echo.port]
        first = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            for c in first:
                c.sendall(b"hi")
                assert c.recv(2) == b"hi"
            third = socket.create_connection(("127.0.0.1", port), timeout=10)  # backlog
            with third:
                third.sendall(b"3rd")
                assert pub.stats["accepted"] == 2 and echo.seen == 2
                first[0].close()      # a relay ends: the third is accepted and relayed
                assert third.recv(3) == b"3rd"
                assert pub.stats["accepted"] == 3
        finally:
            for c in first:
                c.close()


def test_counters_are_consistent_under_concurrent_connections(echo: EchoServer) -> None:
    policy = NetworkPolicy.custom(rules=[
        Rule.deny(direction="ingress", protocol="tcp", destination="127.0.0.2/32"),
        Rule.allow(direction="ingress", protocol="tcp", port=echo.port)])
    with publisher(echo.port, policy.evaluate) as pub:
        port = pub.ports[echo.port]
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                if i % 4 == 0:   # from 127.0.0.2: denied
                    assert_reset(port, "127.0.0.2")
                else:
                    assert roundtrip(port, f"n{i}".encode()) == f"n{i}".encode()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        wait_for(lambda: pub.stats["accepted"] + pub.stats["denied"] == 40)
        assert (pub.stats["accepted"], pub.stats["denied"]) == (30, 10)


def test_close_cuts_relayed_connections(echo: EchoServer) -> None:
    pub = publisher(echo.port)
    c = socket.create_connection(("127.0.0.1", pub.ports[echo.port]), timeout=10)
    with c:
        c.sendall(b"a")
        assert c.recv(1) == b"a"
        pub.close()
        pub.close()
        assert c.recv(10) == b""   # closed by the publisher
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", pub.ports[echo.port]), timeout=2)


def test_udp_relay_per_peer_denied_bounded_and_expiring(udp_echo: int) -> None:
    policy = NetworkPolicy.custom(rules=[
        Rule.deny(direction="ingress", protocol="udp", destination="127.0.0.2/32"),
        Rule.allow(direction="ingress", protocol="udp", port=udp_echo)])
    with publisher(udp_echo, policy.evaluate, "udp", udp_idle_timeout=0.5,
                   max_udp_peers=2) as pub:
        assert pub.ports == {}
        port = pub.udp_ports[udp_echo]
        socks = []
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.2"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((source, 0))
            s.settimeout(2)
            socks.append(s)
        try:
            a, b, c, denied = socks
            a.sendto(b"from a", ("127.0.0.1", port))
            b.sendto(b"from b", ("127.0.0.1", port))
            assert a.recv(100) == b"echo from a" and b.recv(100) == b"echo from b"
            c.sendto(b"from c", ("127.0.0.1", port))   # a third peer: over the bound
            denied.sendto(b"let me in", ("127.0.0.1", port))
            wait_for(lambda: pub.stats["udp_dropped"] == 1 and pub.stats["udp_denied"] == 1)
            # a and b go idle and lose their relays; then c has room
            wait_for(lambda: pub.stats["udp_peers_expired"] == 2)
            c.sendto(b"again", ("127.0.0.1", port))
            assert c.recv(100) == b"echo again"
            wait_for(lambda: pub.stats["udp_replies"] == 3)
            assert pub.stats["udp_forwarded"] == 3
        finally:
            for s in socks:
                s.close()


def test_bad_arguments_and_ports_in_use(echo: EchoServer) -> None:
    for kw, match in (({"max_connections": 0}, "max_connections"),
                      ({"connect_timeout": 0}, "connect_timeout"),
                      ({"max_udp_peers": True}, "max_udp_peers")):
        with pytest.raises(GatewayError, match=match):
            publisher(echo.port, **kw)
    with pytest.raises(GatewayError, match="guest_ip"):
        PortPublisher(socket.socket, "guest", [], ALLOW)
    with pytest.raises(GatewayError, match="check"):
        PortPublisher(socket.socket, "127.0.0.1", [], "allow")  # type: ignore[arg-type]
    with pytest.raises(GatewayError, match="cannot publish"):
        PortPublisher(socket.socket, "127.0.0.1",
                      [PublishedPort(0, 1), PublishedPort(echo.port, 2)], ALLOW)
    before = {t.name for t in threading.enumerate()}
    assert "netstack-publish" not in before   # the failed publisher left no thread


def test_ipv6_host_listeners(echo: EchoServer, udp_echo: int) -> None:
    """``bind="::1"``: IPv6 peers on the host side (the guest side stays IPv4)."""
    with PortPublisher(socket.socket, "127.0.0.1",
                       [PublishedPort(0, echo.port, "tcp", "::1"),
                        PublishedPort(0, udp_echo, "udp", "::1")], ALLOW) as pub:
        with socket.create_connection(("::1", pub.ports[echo.port]), timeout=10) as c:
            c.sendall(b"six")
            assert c.recv(3) == b"six"
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
            u.settimeout(5)
            u.sendto(b"six", ("::1", pub.udp_ports[udp_echo]))
            assert u.recv(100) == b"echo six"
        wait_for(lambda: pub.stats["udp_replies"] == 1)
        assert (pub.stats["accepted"], pub.stats["udp_forwarded"]) == (1, 1)
