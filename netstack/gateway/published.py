"""Published ports: host ``bind:host_port`` -> guest ``guest_port`` (TCP), ingress-checked.

For each mapping a listener on the host (``127.0.0.1`` by default) accepts connections;
each one is checked with ``policy.evaluate(Flow("ingress", "tcp", peer, guest_port))``
(denied: closed with a RST and logged), then relayed over a connection opened *inside
the uplink's network namespace* to the guest's address. Its frames leave that namespace
through the uplink TAP, where the C gateway loop admits only TCP to published guest
ports (classified as ingress) and lets the guest answer only flows it admitted.

>>> PublishedPort.parse("8080:80")
PublishedPort(host_port=8080, guest_port=80, protocol='tcp', bind='127.0.0.1')
>>> PublishedPort.parse((0, 22)).host_port
0
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from netstack.errors import GatewayError
from netstack.flow import Decision, Flow

log = logging.getLogger("netstack.gateway")

IngressCheck = Callable[[Flow], Decision]


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
        if self.protocol != "tcp":
            raise GatewayError(f"published ports support protocol 'tcp' only, got "
                               f"{self.protocol!r}")
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            raise GatewayError(f"published port bind must be an IP address, got "
                               f"{self.bind!r}") from None

    @classmethod
    def parse(cls, value: object) -> PublishedPort:
        """From a PublishedPort, ``(host, guest)`` or ``"host:guest"``.

        >>> PublishedPort.parse("x")
        Traceback (most recent call last):
        ...
        netstack.errors.GatewayError: published port must be 'host:guest', (host, guest) or a PublishedPort, got 'x'
        """
        if isinstance(value, PublishedPort):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(value[0], value[1])
        if isinstance(value, str) and value.count(":") == 1:
            host, guest = value.split(":")
            if host.isdigit() and guest.isdigit():
                return cls(int(host), int(guest))
        raise GatewayError(f"published port must be 'host:guest', (host, guest) or a "
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

    ``netns``: the uplink's namespace (connections to the guest are opened there).

    >>> PortPublisher("ns", "172.16.0.2", [], lambda f: None).ports   # doctest: +SKIP
    {}
    """

    def __init__(self, netns: str, guest_ip: str, mappings: list[PublishedPort],
                 check: IngressCheck, connect_timeout: float = 5.0) -> None:
        self.netns = netns
        self.guest_ip = guest_ip
        self.check = check
        self.connect_timeout = connect_timeout
        self.stats = {"accepted": 0, "denied": 0, "failed": 0}
        self.ports: dict[int, int] = {}   # guest port -> bound host port
        self._stop = threading.Event()
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        try:
            for m in mappings:
                family = socket.AF_INET6 if ":" in m.bind else socket.AF_INET
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
        except OSError as e:
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
        from pyroute2 import netns as pr_netns

        # setns() is per thread: this thread enters the namespace just to create the
        # socket, which stays bound to it
        pr_netns.pushns(self.netns)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            pr_netns.popns()
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
