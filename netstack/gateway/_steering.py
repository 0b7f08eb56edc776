"""The Python half of the steering NAT (``netstack/csrc/steer.c``): loopback listener
pools and the original-destination lookup (the DNS forwarder serves DNS over TCP on its
pool with it: ``ForwarderThread.serve_tcp_socket(sock, lookup=...)``).

An uplink without a local network stack (passt) cannot redirect the guest's TLS and
DNS-over-TCP flows with nftables, and the host sockets it opens for the guest carry
kernel-chosen source ports, so a listener cannot learn from its peer which guest flow it
got. The gateway's C loop steers those flows itself: each one gets a port of a small
pool of listeners on the host's loopback (reached through passt's gateway mapping) on
which no other flow is waiting, and the listener that accepts it *claims* the flow's
original destination from the loop by its own port (:class:`SteerClaim`, a
``lookup(peer, local)`` callback as ``tls_proxy.TlsProxy.listen_transparent`` takes).

A claim also checks that the connection comes from the uplink's process: the peer must
be a loopback socket owned by the uid ``peer_uid`` (passt's), looked up in
``/proc/net/tcp``/``tcp6``; a process of another user that connects to a pool port gets
nothing (``None``) and leaves the flow waiting, so it can never take a guest's flow, and
its secrets, over. A peer already gone (the guest's flow was reset before the listener
accepted it, e.g. a denied SNI) releases the flow and gets nothing. (A local process of
another user that connects and closes at once can thus make one guest connection fail:
a denial of service, never a leak.)

>>> socks = loopback_listeners(2)
>>> len({s.getsockname()[1] for s in socks}), socks[0].getsockname()[0]
(2, '127.0.0.1')
>>> for s in socks: s.close()
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from netstack.errors import GatewayError

log = logging.getLogger("netstack.gateway")

__all__ = ["SteerClaim", "TlsInterception", "loopback_listeners",
           "socket_uid"]

Address = tuple[str, int]
#: ``lookup(peer, local) -> (ip, port) | None``: what a transparent listener asks
Lookup = Callable[[Address, Address], "Address | None"]

#: listener ports of the TLS pool and of the DNS-over-TCP pool
TLS_POOL = 16
DNS_POOL = 4


def loopback_listeners(n: int, *, ipv6: bool = False, backlog: int = 1024
                       ) -> list[socket.socket]:
    """``n`` listening TCP sockets on 127.0.0.1, on ``n`` distinct ports (non-blocking);
    with ``ipv6`` also one on ``[::1]`` of each same port (so ``2 * n`` sockets).

    >>> socks = loopback_listeners(1, ipv6=False)
    >>> socks[0].getsockname()[1] > 0
    True
    >>> socks[0].close()
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 32:
        raise GatewayError(f"listener count must be an int in 1..32, got {n!r}")
    out: list[socket.socket] = []
    try:
        while len(out) < (2 * n if ipv6 else n):
            s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s4.bind(("127.0.0.1", 0))
            pair = [s4]
            if ipv6:
                s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s6.bind(("::1", s4.getsockname()[1]))
                except OSError:
                    s4.close()
                    s6.close()
                    continue          # that port is taken on ::1: try another one
                pair.append(s6)
            for s in pair:
                s.listen(backlog)
                s.setblocking(False)
            out.extend(pair)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


def _proc_addr(addr: Address, v6: bool) -> bytes | None:
    """``addr`` as ``/proc/net/tcp`` (``v6``: ``tcp6``) prints it: the address as
    host-order 32-bit words in hex, ``:``, the port in hex; an IPv4 address in ``tcp6``
    is the v4-mapped one. None if that file cannot hold it (IPv6 in ``tcp``).

    >>> import sys
    >>> _proc_addr(("127.0.0.1", 8080), False) == (b"0100007F:1F90" if sys.byteorder ==
    ...                                             "little" else b"7F000001:1F90")
    True
    >>> _proc_addr(("::1", 53), False) is None, len(_proc_addr(("127.0.0.1", 53), True))
    (True, 37)
    """
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv4Address) and v6:
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    elif isinstance(ip, ipaddress.IPv6Address) and not v6:
        return None
    raw = ip.packed
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return ("".join(f"{w:08X}" for w in words) + f":{int(addr[1]):04X}").encode()


def socket_uid(local: Address, remote: Address) -> int | None:
    """The uid owning the TCP socket bound to ``local`` and connected to ``remote`` in
    this network namespace (``/proc/net/tcp``, ``tcp6``), or None if there is none (or
    only a closed one: time-wait and orphaned sockets have no owner).

    >>> import os
    >>> srv = socket.create_server(("127.0.0.1", 0))
    >>> c = socket.create_connection(srv.getsockname())
    >>> socket_uid(c.getsockname(), srv.getsockname()) == os.geteuid()
    True
    >>> c.close(); srv.close()
    """
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        # the wanted pair as /proc prints it: only a line whose address fields are
        # these very strings is parsed
        want_local, want_remote = _proc_addr(local, v6), _proc_addr(remote, v6)
        if want_local is None or want_remote is None:
            continue
        try:
            # bytes, not text: no codec lookup (an import) in a process that dropped
            # privileges and can no longer read its interpreter's library
            with open(path, "rb") as f:
                next(f, None)
                for raw in f:
                    parts = raw.split()
                    if len(parts) < 10 or parts[1] != want_local or parts[2] != want_remote:
                        continue
                    # no inode: a time-wait or orphaned socket (closed), no owner
                    if parts[3] in (b"06", b"07") or parts[9] == b"0":
                        continue
                    return int(parts[7])
        except OSError:
            continue
    return None


@dataclass
class SteerClaim:
    """The ``lookup(peer, local)`` callback of the steered listeners: the original
    destination of the guest flow waiting on the listener's port, claimed from the C
    loop (``claim(port)``), if the peer is owned by ``peer_uid`` (None: any peer).

    >>> SteerClaim(lambda port: ("192.0.2.7", 443), None)(("127.0.0.1", 5000),
    ...                                                   ("127.0.0.1", 41000))
    ('192.0.2.7', 443)
    >>> claimed = []
    >>> gone = SteerClaim(lambda port: claimed.append(port) or ("192.0.2.7", 443), 0)
    >>> gone(("127.0.0.1", 1), ("127.0.0.1", 2)), claimed     # no such socket: released
    (None, [2])
    """

    claim: Callable[[int], Address | None]
    peer_uid: int | None

    def __call__(self, peer: Address, local: Address) -> Address | None:
        if self.peer_uid is not None:
            uid = socket_uid((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))
            if uid is None:  # the peer is gone: its flow was reset, release it
                self.claim(int(local[1]))
                return None
            if uid != self.peer_uid:
                log.warning("gateway: a connection to steering port %s from %s (uid %s, not "
                            "the uplink's %d) was refused", local[1], peer, uid,
                            self.peer_uid)
                return None
        return self.claim(int(local[1]))


@dataclass
class TlsInterception:
    """Where intercepted TLS flows arrive: ``sockets`` (listening, non-blocking) to serve
    with a transparent proxy, and the ``lookup`` that gives each accepted connection's
    original destination (None: read it with ``SO_ORIGINAL_DST``, the TAP uplink's
    nftables redirect). The caller closes the sockets (serving them hands them over).

    >>> from netstack.gateway import TlsInterception
    >>> ti = TlsInterception((), None)
    >>> ti.close(); ti.sockets
    ()
    """

    sockets: tuple[socket.socket, ...]
    lookup: Lookup | None

    def close(self) -> None:
        """Close every socket (idempotent).

        >>> TlsInterception((), None).close()
        """
        for s in self.sockets:
            s.close()
