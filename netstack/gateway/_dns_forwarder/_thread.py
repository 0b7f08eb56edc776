"""The forwarder for callers that are not asyncio: :class:`ForwarderThread`.

A :class:`~netstack.gateway._dns_forwarder.DnsForwarder` on its own event loop in a
daemon thread (:class:`~netstack.gateway._portal.Portal`, netstack's twin of the
project's one sync-over-async pattern, ``microvm/_portal.py``: start, submit, close,
context manager).

>>> from netstack import NetworkPolicy
>>> from netstack.gateway import DnsForwarder
>>> with ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"])) as t:
...     t.submit(b"\\x00\\x01").result(5) is None   # too short: no reply
True
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
from typing import TYPE_CHECKING

from netstack.errors import DnsForwarderError
from netstack.gateway._portal import Portal

if TYPE_CHECKING:
    from netstack.gateway._dns_forwarder._forwarder import DnsForwarder
    from netstack.gateway._dns_forwarder._listeners import Lookup

log = logging.getLogger("netstack.dns")


class ForwarderThread:
    """A :class:`DnsForwarder` served by its own event loop in a daemon thread.

    For callers that are not asyncio (the C frame loop's slow path): :meth:`submit`
    from any thread returns a ``concurrent.futures.Future`` of the reply bytes. It
    mirrors the project's single sync-over-async pattern (the loop-thread portal,
    :class:`netstack.gateway._portal.Portal`: start, submit, close, context manager);
    the thread starts at construction.

    >>> from netstack import NetworkPolicy
    >>> from netstack.gateway import DnsForwarder
    >>> fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"])
    >>> with ForwarderThread(fwd) as t:
    ...     reply = t.submit(bytes.fromhex("abcd01000001000000000000017800000f0001")).result(5)
    >>> reply[:2].hex(), reply[3] & 0xF   # NXDOMAIN (3), id preserved
    ('abcd', 3)
    """

    def __init__(self, forwarder: DnsForwarder) -> None:
        self.forwarder = forwarder
        self._portal = Portal("dns")
        #: the forwarder's event loop (runs in the thread)
        self.loop: asyncio.AbstractEventLoop = self._portal.loop

    def start(self) -> ForwarderThread:
        """Start the thread (it already runs after construction; idempotent).

        >>> from netstack import NetworkPolicy
        >>> from netstack.gateway import DnsForwarder
        >>> t = ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"]))
        >>> t.start() is t
        True
        >>> t.close()
        """
        if self._portal.closed:
            raise DnsForwarderError("the forwarder thread is closed")
        return self

    def submit(self, wire: bytes, protocol: str = "udp",
               dst: str | tuple[str, int] | None = None
               ) -> concurrent.futures.Future[bytes | None]:
        """Schedule :meth:`DnsForwarder.handle` on the forwarder's loop.

        >>> from netstack import NetworkPolicy
        >>> from netstack.gateway import DnsForwarder
        >>> with ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns,
        ...                                   ["192.0.2.1"])) as t:
        ...     t.submit(b"\\x00\\x01").result(5) is None  # too short: no reply
        True
        """
        if self._portal.closed:
            raise DnsForwarderError("the forwarder thread is closed")
        return self._portal.submit(self.forwarder.handle(wire, protocol, dst))

    def start_listener(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Start the UDP+TCP listeners (:meth:`DnsForwarder.start`) on the thread's loop.

        >>> from netstack import NetworkPolicy
        >>> from netstack.gateway import DnsForwarder
        >>> with ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns,
        ...                                   ["192.0.2.1"])) as t:
        ...     t.start_listener("127.0.0.1", 0)[1] > 0
        True
        """
        if self._portal.closed:
            raise DnsForwarderError("the forwarder thread is closed")
        return self._portal.run(self.forwarder.start(host, port), timeout=10)

    def serve_tcp_socket(self, sock: socket.socket, *, original_dst: bool = False,
                         lookup: Lookup | None = None) -> None:
        """:meth:`DnsForwarder.start_tcp_socket` on the thread's loop (``lookup`` runs in
        its default executor, never blocking it).

        >>> import socket
        >>> from netstack import NetworkPolicy
        >>> from netstack.gateway import DnsForwarder
        >>> with ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns,
        ...                                   ["192.0.2.1"])) as t:
        ...     t.serve_tcp_socket(socket.create_server(("127.0.0.1", 0)))
        """
        if self._portal.closed:
            raise DnsForwarderError("the forwarder thread is closed")
        self._portal.run(self.forwarder.start_tcp_socket(sock, original_dst=original_dst,
                                                         lookup=lookup), timeout=10)

    def close(self) -> None:
        """Stop listeners and the loop, join the thread (idempotent).

        >>> from netstack import NetworkPolicy
        >>> from netstack.gateway import DnsForwarder
        >>> t = ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"]))
        >>> t.close(); t.close(); t.loop.is_closed()
        True
        """
        if self._portal.closed:
            return
        try:
            self._portal.run(self.forwarder.stop(), timeout=10)
        except Exception as e:   # the loop is stopped below anyway
            log.warning("DNS forwarder listeners did not stop cleanly: %s", e)
        finally:
            self._portal.close()

    def __enter__(self) -> ForwarderThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
