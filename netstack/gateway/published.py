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

>>> PublishedPort.parse("8080:80")
PublishedPort(host_port=8080, guest_port=80, protocol='tcp', bind='127.0.0.1')
>>> PublishedPort.parse((0, 22)).host_port
0
>>> PublishedPort.parse("5353:53/udp").protocol
'udp'
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netstack.errors import GatewayError
from netstack.flow import Decision, Flow

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


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class PortPublisher:
    """The listeners and relays of a gateway's published ports.

    ``socket_factory``: the uplink's ``socket(family, kind)`` (connections to the guest
    are opened with it, in the uplink's namespace).

    >>> PortPublisher(uplink.socket, "172.16.0.2", [], policy.evaluate).ports  # doctest: +SKIP
    {}
    """

    def __init__(self, socket_factory: SocketFactory, guest_ip: str,
                 mappings: list[PublishedPort], check: IngressCheck,
                 connect_timeout: float = 5.0, udp_idle_timeout: float = 60.0) -> None:
        self.socket_factory = socket_factory
        self.guest_ip = guest_ip
        self.check = check
        self.connect_timeout = connect_timeout
        self.udp_idle_timeout = udp_idle_timeout
        self.stats = {"accepted": 0, "denied": 0, "failed": 0, "udp_forwarded": 0,
                      "udp_denied": 0, "udp_replies": 0, "udp_peers_expired": 0}
        self.ports: dict[int, int] = {}   # guest port -> bound host port (TCP)
        self.udp_ports: dict[int, int] = {}  # guest port -> bound host port (UDP)
        self._stop = threading.Event()
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        try:
            for m in mappings:
                family = socket.AF_INET6 if ":" in m.bind else socket.AF_INET
                if m.protocol == "udp":
                    self._start_udp(family, m)
                    continue
                srv = socket.socket(family, socket.SOCK_STREAM)
                srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    srv.bind((m.bind, m.host_port))
                except OSError as e:
                    srv.close()
                    raise GatewayError(f"cannot publish {m.bind}:{m.host_port} -> guest "
                                       f"{m.guest_port}: {e}") from e
                srv.listen(128)
                srv.settimeout(0.2)
                self._listeners.append(srv)
                self.ports[m.guest_port] = int(srv.getsockname()[1])
                t = threading.Thread(target=self._accept, args=(srv, m), daemon=True,
                                     name=f"netstack-publish-{m.guest_port}")
                t.start()
                self._threads.append(t)
        except BaseException:
            self.close()
            raise

    def _start_udp(self, family: socket.AddressFamily, m: PublishedPort) -> None:
        srv = socket.socket(family, socket.SOCK_DGRAM)
        try:
            srv.bind((m.bind, m.host_port))
        except OSError as e:
            srv.close()
            raise GatewayError(f"cannot publish {m.bind}:{m.host_port}/udp -> guest "
                               f"{m.guest_port}: {e}") from e
        srv.settimeout(0.2)
        self._listeners.append(srv)
        self.udp_ports[m.guest_port] = int(srv.getsockname()[1])
        t = threading.Thread(target=self._udp_serve, args=(srv, m), daemon=True,
                             name=f"netstack-publish-udp-{m.guest_port}")
        t.start()
        self._threads.append(t)

    def _udp_serve(self, srv: socket.socket, m: PublishedPort) -> None:
        """Datagrams from host peers -> the guest, one relay socket per peer."""
        relays: dict[tuple[str, int], list[Any]] = {}   # peer -> [socket, last seen]
        last_sweep = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_sweep > 1.0:
                    last_sweep = now
                    for peer, (sock, seen) in list(relays.items()):
                        if now - seen > self.udp_idle_timeout:
                            del relays[peer]
                            sock.close()   # its reply thread ends
                            self.stats["udp_peers_expired"] += 1
                try:
                    data, addr = srv.recvfrom(65535)
                except TimeoutError:
                    continue
                except OSError:
                    return
                peer = (str(addr[0]), int(addr[1]))
                decision = self.check(Flow("ingress", "udp", peer[0], m.guest_port))
                if decision.action != "allow":
                    self.stats["udp_denied"] += 1
                    log.info("published port %s:%s/udp -> guest %s: datagram from %s denied "
                             "(%s)", m.bind, self.udp_ports.get(m.guest_port), m.guest_port,
                             peer[0], decision.reason)
                    continue
                relay = relays.get(peer)
                if relay is None:
                    try:
                        sock = self._udp_socket(m.guest_port)
                    except (OSError, GatewayError) as e:   # GatewayError: uplink closed
                        self.stats["failed"] += 1
                        log.info("published port -> guest %s/udp: %s", m.guest_port, e)
                        continue
                    relay = relays[peer] = [sock, now]
                    threading.Thread(target=self._udp_replies, args=(sock, srv, addr),
                                     daemon=True, name="netstack-publish-udp-peer").start()
                relay[1] = now
                try:
                    relay[0].send(data)
                    self.stats["udp_forwarded"] += 1
                except OSError as e:
                    log.info("published port -> guest %s/udp: %s", m.guest_port, e)
        finally:
            for sock, _ in relays.values():
                sock.close()

    def _udp_socket(self, port: int) -> socket.socket:
        sock = self.socket_factory(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect((self.guest_ip, port))
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.5)
        return sock

    def _udp_replies(self, sock: socket.socket, srv: socket.socket, addr: Any) -> None:
        """The guest's replies to one peer's relay socket go back to that peer."""
        while not self._stop.is_set():
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:   # closed (idle peer, shutdown) or ICMP error from the guest
                if sock.fileno() == -1:
                    return
                continue
            try:
                srv.sendto(data, addr)
                self.stats["udp_replies"] += 1
            except OSError:
                return

    def _accept(self, srv: socket.socket, m: PublishedPort) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, str(peer[0]), m), daemon=True,
                             name="netstack-publish-conn").start()

    def _serve(self, conn: socket.socket, peer: str, m: PublishedPort) -> None:
        decision = self.check(Flow("ingress", "tcp", peer, m.guest_port))
        if decision.action != "allow":
            self.stats["denied"] += 1
            log.info("published port %s:%s -> guest %s: connection from %s denied (%s)",
                     m.bind, self.ports.get(m.guest_port), m.guest_port, peer, decision.reason)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST
            return
        try:
            guest = self._connect(m.guest_port)
        except (OSError, GatewayError) as e:   # GatewayError: the uplink is closed
            self.stats["failed"] += 1
            log.info("published port -> guest %s: cannot reach the guest: %s", m.guest_port, e)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return
        self.stats["accepted"] += 1
        with self._lock:
            self._conns.update((conn, guest))
        a = threading.Thread(target=_pump, args=(conn, guest), daemon=True)
        a.start()
        _pump(guest, conn)
        a.join()
        with self._lock:
            self._conns.difference_update((conn, guest))
        conn.close()
        guest.close()

    def _connect(self, port: int) -> socket.socket:
        sock = self.socket_factory(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect((self.guest_ip, port))
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def close(self) -> None:
        """Stop listening and cut every relayed connection (idempotent)."""
        self._stop.set()
        for srv in self._listeners:
            srv.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(2)
        self._listeners.clear()
