"""Published ports: host ``bind:host_port`` -> guest ``guest_port`` (TCP/UDP), ingress-checked.

For each mapping a listener on the host (``127.0.0.1`` by default) accepts connections;
each one is checked with ``policy.evaluate(Flow("ingress", "tcp", peer, guest_port))``
(denied: closed with a RST and logged), then relayed over a connection opened *inside
the uplink's network namespace* (a socket from the uplink's ``socket()``, see
:class:`~netstack.gateway.RedirectingUplink`) to the guest's address. Its frames leave that namespace
through the uplink TAP, where the C gateway loop admits only TCP to published guest
ports (classified as ingress) and lets the guest answer only flows it admitted.

UDP (``"5353:53/udp"``): a socket on the host; every datagram is checked with
``policy.evaluate(Flow("ingress", "udp", peer, guest_port))`` (denied: dropped and
logged), then sent to the guest from a per-peer socket opened inside the uplink
namespace; the guest's replies to that socket go back to that peer. A peer idle for
``udp_idle_timeout`` (60 s) loses its relay socket.

Everything runs on one asyncio event loop in a daemon thread
(:class:`~netstack.gateway._portal.Portal`; callers stay synchronous). It is
bounded: at most ``max_connections`` TCP relays at once (more clients wait in the
listener's backlog: they are accepted as relays finish, none is refused), at most
``max_udp_peers`` UDP peers with a relay socket (a new peer's datagrams beyond that are
dropped and counted, ``udp_dropped``); a relay reads from one side only as fast as the
other side takes the data. The counters (:attr:`PortPublisher.stats`) change only on the
loop and are read as one consistent snapshot.

>>> PublishedPort.parse("8080:80")
PublishedPort(host_port=8080, guest_port=80, protocol='tcp', bind='127.0.0.1')
>>> PublishedPort.parse((0, 22)).host_port
0
>>> PublishedPort.parse("5353:53/udp").protocol
'udp'
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from netstack._flow import Decision, Flow
from netstack.errors import GatewayError
from netstack.gateway._portal import Portal

log = logging.getLogger("netstack.gateway")

IngressCheck = Callable[[Flow], Decision]
#: ``socket(family, kind)``: a new socket in the uplink's network (namespace)
SocketFactory = Callable[[int, int], socket.socket]


@dataclass(frozen=True)
class PublishedPort:
    """One mapping; ``host_port`` 0 picks a free port (see ``Gateway.published``).

    >>> PublishedPort(8443, 443).bind
    '127.0.0.1'
    """

    host_port: int
    guest_port: int
    protocol: str = "tcp"
    bind: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name, value, lo in (("host_port", self.host_port, 0),
                                ("guest_port", self.guest_port, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 65535:
                raise GatewayError(f"published port {name} must be an int in {lo}..65535, "
                                   f"got {value!r}")
        if self.protocol not in ("tcp", "udp"):
            raise GatewayError(f"published port protocol must be 'tcp' or 'udp', got "
                               f"{self.protocol!r}")
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            raise GatewayError(f"published port bind must be an IP address, got "
                               f"{self.bind!r}") from None

    @classmethod
    def parse(cls, value: object) -> PublishedPort:
        """From a PublishedPort, ``(host, guest)``, ``"host:guest"`` or ``"host:guest/udp"``.

        >>> PublishedPort.parse("x")
        Traceback (most recent call last):
        ...
        netstack.errors.GatewayError: published port must be 'host:guest[/udp]', (host, guest) or a PublishedPort, got 'x'
        """
        if isinstance(value, PublishedPort):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(value[0], value[1])
        if isinstance(value, str) and value.count(":") == 1:
            spec, slash, proto = value.partition("/")
            host, guest = spec.split(":")
            if host.isdigit() and guest.isdigit() and (proto in ("tcp", "udp") or not slash):
                return cls(int(host), int(guest), proto or "tcp")
        raise GatewayError(f"published port must be 'host:guest[/udp]', (host, guest) or a "
                           f"PublishedPort, got {value!r}")


#: the counters of :attr:`PortPublisher.stats`
STAT_KEYS: Final = ("accepted", "denied", "failed", "udp_forwarded", "udp_denied",
                    "udp_replies", "udp_peers_expired", "udp_dropped")
_WRITE_HIGH: Final = 1 << 20   # bytes a relay buffers for a slow side before it stops reading
_RST: Final = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends a RST


def _reset(sock: socket.socket) -> None:
    """Close with a RST (a refused connection)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    sock.close()


class _Splice(asyncio.Protocol):
    """One side of a relayed TCP connection: what it receives is written to its peer.

    Backpressure: when the peer's write buffer is full (``pause_writing`` on the peer),
    this side stops reading until it drains. An EOF is passed on as a half-close; the
    relay ends when both sides sent EOF or either side is lost (a reset or error aborts
    the other side too).
    """

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.peer: _Splice | None = None
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]  # until both sides exist
        # the peer's socket buffer is the real bound; this keeps pause/resume rare
        transport.set_write_buffer_limits(high=_WRITE_HIGH)  # type: ignore[attr-defined]

    def start(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return False
        if peer.eof:   # both directions finished: close (buffers are flushed first)
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True    # keep our side open: the peer may still answer

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None \
                and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            if exc is not None:
                peer.transport.abort()
            else:
                peer.transport.close()
        if (peer is None or peer.lost) and not self.done.done():
            self.done.set_result(None)


class _UdpRelay:
    """One host peer's socket in the uplink namespace, connected to the guest port."""

    __slots__ = ("last_seen", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: tuple[str, int], now: float) -> None:
        self.sock = sock
        self.peer = peer
        self.last_seen = now


class _UdpFront(asyncio.DatagramProtocol):
    """The host socket of one UDP mapping and its per-peer relays."""

    def __init__(self, publisher: PortPublisher, mapping: PublishedPort) -> None:
        self.publisher = publisher
        self.mapping = mapping
        self.transport: asyncio.DatagramTransport | None = None
        self.relays: dict[tuple[str, int], _UdpRelay] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.publisher._udp_datagram(self, data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("published port -> guest %s/udp: %s", self.mapping.guest_port, exc)

    def drop(self, peer: tuple[str, int]) -> None:
        relay = self.relays.pop(peer, None)
        if relay is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(relay.sock.fileno())
            relay.sock.close()

    def close(self) -> None:
        for peer in list(self.relays):
            self.drop(peer)
        if self.transport is not None:
            self.transport.close()


class PortPublisher:
    """The listeners and relays of a gateway's published ports (see the module docstring).

    ``socket_factory``: the uplink's ``socket(family, kind)`` (connections to the guest
    are opened with it, in the uplink's namespace). ``check``: the ingress check of
    every connection and datagram (``policy.evaluate``; may be replaced while running).
    The listeners are bound before the constructor returns (a port in use raises
    :class:`~netstack.errors.GatewayError`); :meth:`close` stops everything.

    Here the "guest" is a server on the host's loopback (``socket.socket`` as the
    factory), which needs no root:

    >>> import socket
    >>> from netstack import NetworkPolicy
    >>> server = socket.create_server(("127.0.0.1", 0))
    >>> pub = PortPublisher(socket.socket, "127.0.0.1",
    ...                     [PublishedPort(0, server.getsockname()[1])],
    ...                     NetworkPolicy.allow_all().evaluate)
    >>> client = socket.create_connection(("127.0.0.1", next(iter(pub.ports.values()))))
    >>> conn, _ = server.accept(); client.sendall(b"ping"); conn.recv(4)
    b'ping'
    >>> client.close(); conn.close(); pub.close(); server.close()
    >>> pub.stats["accepted"]
    1
    """

    def __init__(self, socket_factory: SocketFactory, guest_ip: str,
                 mappings: list[PublishedPort], check: IngressCheck,
                 connect_timeout: float = 5.0, udp_idle_timeout: float = 60.0, *,
                 max_connections: int = 256, max_udp_peers: int = 256) -> None:
        if not callable(socket_factory):
            raise GatewayError(f"socket_factory must be callable like uplink.socket, got "
                               f"{socket_factory!r}")
        try:
            guest = ipaddress.IPv4Address(guest_ip)
        except (ValueError, TypeError):
            raise GatewayError(f"guest_ip must be an IPv4 address, got {guest_ip!r}") from None
        if not callable(check):
            raise GatewayError(f"check must be callable like policy.evaluate, got {check!r}")
        for name, value in (("connect_timeout", connect_timeout),
                            ("udp_idle_timeout", udp_idle_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 < value <= 86400:
                raise GatewayError(f"{name} must be seconds in (0, 86400], got {value!r}")
        for name, value in (("max_connections", max_connections),
                            ("max_udp_peers", max_udp_peers)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 1 <= value <= 65536:
                raise GatewayError(f"{name} must be an int in 1..65536, got {value!r}")
        parsed = [PublishedPort.parse(m) for m in mappings]
        self.socket_factory = socket_factory
        self.guest_ip = str(guest)
        self.check = check
        self.connect_timeout = float(connect_timeout)
        self.udp_idle_timeout = float(udp_idle_timeout)
        self.max_connections = max_connections
        self.max_udp_peers = max_udp_peers
        self.ports: dict[int, int] = {}   # guest port -> bound host port (TCP)
        self.udp_ports: dict[int, int] = {}  # guest port -> bound host port (UDP)
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._stats_lock = threading.Lock()
        self._listeners: list[tuple[socket.socket, PublishedPort]] = []
        self._fronts: list[_UdpFront] = []
        self._relays: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []   # accept loops, the UDP sweep
        self._slots = asyncio.Semaphore(max_connections)
        self._portal: Portal | None = None
        try:
            for m in parsed:
                self._listeners.append((self._bind(m), m))
            self._portal = Portal("publish")
            self._portal.run(self._start(), timeout=10)
        except BaseException:
            self.close()
            raise

    # -- the synchronous surface ---------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the counters (:data:`STAT_KEYS`).

        >>> from netstack import NetworkPolicy
        >>> pub = PortPublisher(socket.socket, "127.0.0.1", [], NetworkPolicy.none().evaluate)
        >>> pub.stats["accepted"], pub.stats["udp_dropped"]
        (0, 0)
        >>> pub.close()
        """
        with self._stats_lock:
            return dict(self._stats)

    def close(self) -> None:
        """Stop listening and cut every relayed connection (idempotent).

        >>> from netstack import NetworkPolicy
        >>> pub = PortPublisher(socket.socket, "127.0.0.1", [], NetworkPolicy.none().evaluate)
        >>> pub.close(); pub.close()
        """
        portal = self._portal
        if portal is not None and not portal.closed:
            try:
                portal.run(self._shutdown(), timeout=10)
            except Exception as e:   # the loop is stopped below anyway
                log.warning("published ports did not stop cleanly: %s", e)
            finally:
                portal.close()
        for srv, _ in self._listeners:   # bound but never served (a failed start)
            srv.close()

    def __enter__(self) -> PortPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup (caller's thread, then the loop) ------------------------------------------
    def _bind(self, m: PublishedPort) -> socket.socket:
        family = socket.AF_INET6 if ":" in m.bind else socket.AF_INET
        kind = socket.SOCK_DGRAM if m.protocol == "udp" else socket.SOCK_STREAM
        srv = socket.socket(family, kind)
        try:
            if kind == socket.SOCK_STREAM:
                srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((m.bind, m.host_port))
            if kind == socket.SOCK_STREAM:
                srv.listen(128)
        except OSError as e:
            srv.close()
            suffix = "/udp" if m.protocol == "udp" else ""
            raise GatewayError(f"cannot publish {m.bind}:{m.host_port}{suffix} -> guest "
                               f"{m.guest_port}: {e}") from e
        srv.setblocking(False)
        (self.udp_ports if m.protocol == "udp" else self.ports)[m.guest_port] = \
            int(srv.getsockname()[1])
        return srv

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for srv, m in self._listeners:
            if m.protocol == "udp":
                front = _UdpFront(self, m)
                await loop.create_datagram_endpoint(lambda f=front: f, sock=srv)  # type: ignore[misc]
                self._fronts.append(front)
            else:
                self._tasks.append(loop.create_task(self._accept_loop(srv, m),
                                                    name=f"publish-{m.guest_port}"))
        if self._fronts:
            self._tasks.append(loop.create_task(self._sweep(), name="publish-udp-sweep"))

    async def _shutdown(self) -> None:
        """On the loop, first thing in :meth:`close`: no new work, relays cut."""
        tasks = [*self._tasks, *self._relays]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for front in self._fronts:
            front.close()
        for srv, _ in self._listeners:
            srv.close()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1

    def _decide(self, flow: Flow) -> Decision:
        try:
            return self.check(flow)
        except Exception as e:   # a broken check denies, it never kills the listener
            log.error("published port ingress check failed for %s: %s; denying", flow, e)
            return Decision("deny", None, f"ingress check failed: {e}")

    # -- TCP -------------------------------------------------------------------------------
    async def _accept_loop(self, srv: socket.socket, m: PublishedPort) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()   # at most max_connections: the rest wait in the backlog
            try:
                conn, peer = await loop.sock_accept(srv)
            except OSError as e:   # out of file descriptors, say: keep the listener
                self._slots.release()
                log.warning("published port %s:%s -> guest %s: accept failed: %s", m.bind,
                            self.ports.get(m.guest_port), m.guest_port, e)
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            task = loop.create_task(self._serve(conn, str(peer[0]), m))
            self._relays.add(task)
            task.add_done_callback(self._relay_done)

    def _relay_done(self, task: asyncio.Task[None]) -> None:
        self._relays.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("published port relay failed: %r", task.exception())

    async def _serve(self, conn: socket.socket, peer: str, m: PublishedPort) -> None:
        decision = self._decide(Flow("ingress", "tcp", peer, m.guest_port))
        if decision.action != "allow":
            self._count("denied")
            log.info("published port %s:%s -> guest %s: connection from %s denied (%s)",
                     m.bind, self.ports.get(m.guest_port), m.guest_port, peer, decision.reason)
            _reset(conn)
            return
        try:
            guest = await self._connect(m.guest_port)
        except (OSError, GatewayError) as e:   # GatewayError: the uplink is closed
            self._count("failed")
            log.info("published port -> guest %s: cannot reach the guest: %s", m.guest_port,
                     e or type(e).__name__)
            _reset(conn)
            return
        except BaseException:
            _reset(conn)
            raise
        self._count("accepted")
        await self._relay(conn, guest)

    async def _connect(self, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = self.socket_factory(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(self.connect_timeout):
                await loop.sock_connect(sock, (self.guest_ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _relay(self, conn: socket.socket, guest: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        client, inner = _Splice(done), _Splice(done)
        client.peer, inner.peer = inner, client
        owned: list[socket.socket] = [conn, guest]   # until a transport owns them
        try:
            await loop.connect_accepted_socket(lambda: client, sock=conn)
            owned.remove(conn)
            await loop.connect_accepted_socket(lambda: inner, sock=guest)
            owned.remove(guest)
            client.start()
            inner.start()
            await done
        finally:
            for side in (client, inner):
                if side.transport is not None and not side.lost:
                    side.transport.abort()
            for sock in owned:
                sock.close()

    # -- UDP -------------------------------------------------------------------------------
    def _udp_datagram(self, front: _UdpFront, data: bytes, peer: tuple[str, int]) -> None:
        m = front.mapping
        decision = self._decide(Flow("ingress", "udp", peer[0], m.guest_port))
        if decision.action != "allow":
            self._count("udp_denied")
            log.info("published port %s:%s/udp -> guest %s: datagram from %s denied (%s)",
                     m.bind, self.udp_ports.get(m.guest_port), m.guest_port, peer[0],
                     decision.reason)
            return
        loop = asyncio.get_running_loop()
        relay = front.relays.get(peer)
        if relay is None:
            if sum(len(f.relays) for f in self._fronts) >= self.max_udp_peers:
                self._count("udp_dropped")
                log.debug("published port -> guest %s/udp: %d peers already, dropping a "
                          "datagram from new peer %s", m.guest_port, self.max_udp_peers, peer)
                return
            try:
                sock = self.socket_factory(socket.AF_INET, socket.SOCK_DGRAM)
            except (OSError, GatewayError) as e:   # GatewayError: uplink closed
                self._count("failed")
                log.info("published port -> guest %s/udp: %s", m.guest_port, e)
                return
            try:
                sock.setblocking(False)
                sock.connect((self.guest_ip, m.guest_port))
            except OSError as e:
                sock.close()
                self._count("failed")
                log.info("published port -> guest %s/udp: %s", m.guest_port, e)
                return
            relay = front.relays[peer] = _UdpRelay(sock, peer, loop.time())
            loop.add_reader(sock.fileno(), self._udp_replies, front, relay)
        relay.last_seen = loop.time()
        try:
            relay.sock.send(data)
        except OSError as e:   # BlockingIOError: the guest side is full, drop as UDP does
            log.info("published port -> guest %s/udp: %s", m.guest_port, e)
            return
        self._count("udp_forwarded")

    def _udp_replies(self, front: _UdpFront, relay: _UdpRelay) -> None:
        """The guest's replies to one peer's relay socket go back to that peer."""
        for _ in range(64):   # then let the loop breathe
            try:
                data = relay.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:   # ICMP error from the guest (port unreachable): keep going
                continue
            if front.transport is None or front.transport.is_closing():
                return
            front.transport.sendto(data, relay.peer)
            self._count("udp_replies")

    async def _sweep(self) -> None:
        """Expire relays of peers idle for ``udp_idle_timeout``."""
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.udp_idle_timeout / 2)
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for front in self._fronts:
                for peer, relay in list(front.relays.items()):
                    if now - relay.last_seen > self.udp_idle_timeout:
                        front.drop(peer)
                        self._count("udp_peers_expired")
