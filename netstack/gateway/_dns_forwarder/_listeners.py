"""The forwarder's listeners: DNS over UDP and TCP on real sockets.

:class:`Listeners` serves any :class:`QueryHandler` (``DnsForwarder.handle`` is one):
UDP datagrams, TCP connections (two-byte length prefix, several queries per connection,
closed after ``_TCP_IDLE_TIMEOUT`` idle seconds), and TCP on a socket someone else
bound (one created inside the uplink's network namespace, or a steering pool's loopback
listener), optionally telling the handler which resolver the guest asked: each
connection's pre-NAT destination (:func:`original_destination`), or the answer of a
``lookup(peer, local)`` callback (:data:`Lookup`).

>>> import asyncio, socket
>>> async def echo_id(wire: bytes, protocol: str = "udp", dst=None) -> bytes | None:
...     return wire[:2] + b"\\x81\\x83" + bytes(8)     # NXDOMAIN, same id
>>> async def demo():
...     listeners = Listeners(echo_id, timeout=5.0)
...     host, port = await listeners.start("127.0.0.1", 0)
...     loop = asyncio.get_running_loop()
...     with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
...         s.setblocking(False)
...         await loop.sock_connect(s, (host, port))
...         await loop.sock_sendall(s, bytes.fromhex("beef01000001000000000000"))
...         reply = await loop.sock_recv(s, 512)
...     await listeners.stop()
...     return reply[:4].hex()
>>> asyncio.run(demo())
'beef8183'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

from netstack.gateway._sockopt import original_dst

log = logging.getLogger("netstack.dns")

_TCP_IDLE_TIMEOUT: Final = 30.0

#: ``lookup(peer, local) -> (ip, port) | None``: a connection's original destination
#: (the shape ``tls_proxy.TlsProxy.listen_transparent`` takes); None closes it
Lookup = Callable[[tuple[str, int], tuple[str, int]], "tuple[str, int] | None"]


class QueryHandler(Protocol):
    """``DnsForwarder.handle``-shaped: one DNS message in, the reply (or None) out.

    >>> import asyncio
    >>> async def drop_all(wire: bytes, protocol: str = "udp", dst=None) -> bytes | None:
    ...     return None
    >>> handler: QueryHandler = drop_all
    >>> asyncio.run(handler(b"\\x00" * 12)) is None
    True
    """

    async def __call__(self, wire: bytes, protocol: str = ...,
                       dst: str | tuple[str, int] | None = ...) -> bytes | None: ...


def original_destination(sock: Any) -> tuple[str, int] | None:
    """The pre-NAT destination of an accepted TCP socket (``SO_ORIGINAL_DST``: IPv4,
    IPv6, or an IPv4 connection on a dual-stack IPv6 socket), or None when conntrack has
    no record of it (no conntrack, not an IP socket).

    >>> import socket
    >>> a, b = socket.socketpair()
    >>> original_destination(a) is None
    True
    """
    try:
        return original_dst(sock)
    except (OSError, struct.error):
        return None


class Listeners:
    """The UDP and TCP listeners of one handler; :meth:`stop` closes them all.

    ``timeout``: seconds a TCP client has to send the rest of a message once its
    length prefix arrived.

    >>> import asyncio
    >>> async def nothing(wire: bytes, protocol: str = "udp", dst=None) -> bytes | None:
    ...     return None
    >>> asyncio.run(Listeners(nothing, 5.0).stop())   # nothing started: a no-op
    """

    def __init__(self, handle: QueryHandler, timeout: float) -> None:
        self.handle = handle
        self.timeout = timeout
        self._servers: list[asyncio.AbstractServer | asyncio.DatagramTransport] = []

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve UDP and TCP on ``host``:``port`` (0 = pick one); returns the address.

        >>> import asyncio
        >>> async def nothing(wire: bytes, protocol: str = "udp", dst=None) -> bytes | None:
        ...     return None
        >>> async def demo():
        ...     ls = Listeners(nothing, 5.0)
        ...     host, port = await ls.start("127.0.0.1", 0)
        ...     await ls.stop()
        ...     return host, port > 0
        >>> asyncio.run(demo())
        ('127.0.0.1', True)
        """
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self.serve_tcp, host, port)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self.handle), local_addr=(host, bound[1]))
        self._servers.append(transport)
        return str(bound[0]), int(bound[1])

    async def start_tcp_socket(self, sock: socket.socket, *, original_dst: bool = False,
                               lookup: Lookup | None = None) -> None:
        """Serve DNS over TCP on a bound, listening socket; ``original_dst``: pass each
        connection's pre-NAT destination to the handler as ``dst``; ``lookup``: pass
        ``lookup(peer, local)`` instead (run in the loop's default executor: it may read
        ``/proc``), and close a connection it answers None for.

        >>> import asyncio, socket
        >>> async def nothing(wire: bytes, protocol: str = "udp", dst=None) -> bytes | None:
        ...     return None
        >>> async def demo():
        ...     ls = Listeners(nothing, 5.0)
        ...     await ls.start_tcp_socket(socket.create_server(("127.0.0.1", 0)))
        ...     await ls.stop()
        >>> asyncio.run(demo())
        >>> async def refused():        # a lookup answering None: closed, nothing served
        ...     ls = Listeners(nothing, 5.0)
        ...     srv = socket.create_server(("127.0.0.1", 0))
        ...     await ls.start_tcp_socket(srv, lookup=lambda peer, local: None)
        ...     r, w = await asyncio.open_connection(*srv.getsockname())
        ...     data = await r.read()
        ...     w.close(); await ls.stop()
        ...     return data
        >>> asyncio.run(refused())
        b''
        """
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            dst = None
            if lookup is not None:
                dst = await self._lookup(lookup, writer)
                if dst is None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()
                    return
            elif original_dst:
                conn = writer.get_extra_info("socket")
                dst = original_destination(conn) if conn is not None else None
            await self.serve_tcp(reader, writer, dst)

        server = await asyncio.start_server(serve, sock=sock)
        self._servers.append(server)

    @staticmethod
    async def _lookup(lookup: Lookup, writer: asyncio.StreamWriter) -> tuple[str, int] | None:
        """``lookup(peer, local)`` of the connection, off the loop; None if it failed."""
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        if peer is None or local is None:        # already reset
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, lookup, (peer[0], peer[1]), (local[0], local[1]))
        except Exception:   # never let one connection take the listener down
            log.exception("DNS over TCP: the destination lookup failed")
            return None

    async def stop(self) -> None:
        """Close every listener (idempotent).

        >>> import asyncio
        >>> async def nothing(wire: bytes, protocol: str = "udp", dst=None) -> bytes | None:
        ...     return None
        >>> ls = Listeners(nothing, 5.0); asyncio.run(ls.stop()); asyncio.run(ls.stop())
        """
        servers, self._servers = self._servers, []
        for s in servers:
            s.close()
            if isinstance(s, asyncio.AbstractServer):
                await s.wait_closed()

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        dst: tuple[str, int] | None = None) -> None:
        """One TCP client: length-prefixed queries until EOF, an error or idleness.

        >>> import asyncio
        >>> async def nothing(wire: bytes, protocol: str = "udp", dst=None) -> bytes | None:
        ...     return None
        >>> async def demo():
        ...     ls = Listeners(nothing, 5.0)
        ...     host, port = await ls.start("127.0.0.1", 0)
        ...     r, w = await asyncio.open_connection(host, port)
        ...     w.write_eof()                       # no query: the server closes
        ...     data = await r.read()
        ...     w.close(); await ls.stop()
        ...     return data
        >>> asyncio.run(demo())
        b''
        """
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), _TCP_IDLE_TIMEOUT)
                (length,) = struct.unpack("!H", header)
                wire = await asyncio.wait_for(reader.readexactly(length), self.timeout)
                answer = await self.handle(wire, "tcp", dst)
                if answer is not None:
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, handle: QueryHandler) -> None:
        self.handle = handle
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            answer = await self.handle(data, "udp")
        except Exception:
            log.exception("DNS forwarder failed on a UDP query from %s", addr)
            return
        if answer is not None and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.sendto(answer, addr)
