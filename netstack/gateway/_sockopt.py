"""``SO_ORIGINAL_DST``: the pre-NAT destination of a redirected TCP connection.

One job: ask conntrack, through the socket, where an accepted connection was going
before an nftables ``redirect``/``dnat`` sent it to us. The layering rule forbids
``netstack`` and ``tls_proxy`` importing each other, so each carries this same private
module (``netstack/gateway/_sockopt.py`` and ``tls_proxy/_sockopt.py``, identical, kept
so by ``tests/tls_proxy/test_sockopt.py``, which runs one table of cases through both).

The three kinds of accepted socket:

* ``AF_INET``: the IPv4 conntrack entry (``SOL_IP``).
* ``AF_INET6`` with an IPv6 peer: the IPv6 entry (``SOL_IPV6``, ``IP6T_SO_ORIGINAL_DST``).
* ``AF_INET6`` holding an IPv4 connection (a dual-stack listener: local address
  ``::ffff:a.b.c.d``): the entry is IPv4, so ``SOL_IP`` is asked (``SOL_IPV6`` would
  find nothing), and the answer is a plain dotted IPv4 address.

>>> import socket
>>> a, b = socket.socketpair()
>>> try:
...     original_dst(a)
... except OSError as e:
...     print("no conntrack record:", type(e).__name__)
no conntrack record: OSError
>>> a.close(); b.close()
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Final

#: getsockopt name of the pre-NAT destination (SO_ORIGINAL_DST = IP6T_SO_ORIGINAL_DST = 80)
SO_ORIGINAL_DST: Final = 80


def _is_v4_mapped(sock: socket.socket) -> bool:
    """Whether an AF_INET6 socket carries an IPv4 connection (local ``::ffff:a.b.c.d``)."""
    host = str(sock.getsockname()[0]).split("%", 1)[0]
    try:
        return ipaddress.IPv6Address(host).ipv4_mapped is not None
    except ValueError:
        return False


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """``(ip, port)`` the connection on ``sock`` was sent to before NAT.

    Raises ``OSError`` when conntrack has no record of it (not NATed, no conntrack,
    not a TCP/IP socket). IPv4 answers are dotted quads, also for an IPv4 connection
    accepted on a dual-stack IPv6 socket; IPv6 answers are compressed text.

    >>> import socket
    >>> with socket.create_server(("127.0.0.1", 0)) as srv:
    ...     c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
    ...     try:   # tracked but not redirected: its own destination; untracked: OSError
    ...         redirected = original_dst(s) != s.getsockname()
    ...     except OSError:
    ...         redirected = False
    ...     finally:
    ...         c.close(); s.close()
    >>> redirected
    False
    """
    if sock.family == socket.AF_INET6 and not _is_v4_mapped(sock):
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        if len(raw) < 24:
            raise OSError(f"SO_ORIGINAL_DST gave {len(raw)} bytes, need 24 (sockaddr_in6)")
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        ip6 = ipaddress.IPv6Address(packed)
        mapped = ip6.ipv4_mapped
        return (str(mapped) if mapped is not None else str(ip6)), int(port)
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise OSError(f"SO_ORIGINAL_DST needs an IPv4 or IPv6 socket, got {sock.family!r}")
    # IPv4, also an IPv4 connection accepted on a dual-stack socket: its conntrack entry
    # is IPv4, which SOL_IP asks for
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    if len(raw) < 8:
        raise OSError(f"SO_ORIGINAL_DST gave {len(raw)} bytes, need 8 (sockaddr_in)")
    port, packed = struct.unpack_from("!2xH4s", raw)
    return str(ipaddress.IPv4Address(packed)), int(port)
