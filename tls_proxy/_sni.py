"""A small pure-Python TLS ClientHello reader (SNI and ALPN) for standalone use.

The proxy takes any callable with the :data:`HelloParser` shape, so a gateway can
inject its own (e.g. ``netstack.parse_client_hello``); this one is the default.
A ClientHello split over several TLS records is reassembled.

Example::

    >>> from tls_proxy import parse_client_hello
    >>> parse_client_hello(b"\\x16\\x03\\x01")      # incomplete: read more bytes
    >>> parse_client_hello(b"GET / HTTP/1.1\\r\\n")
    Traceback (most recent call last):
    ...
    tls_proxy.errors.ClientHelloError: not a TLS handshake: first byte 0x47 ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tls_proxy.errors import ClientHelloError

MAX_HELLO = 16384 + 5
"""Largest first flight we read before giving up (one maximal TLS record)."""


@dataclass(frozen=True)
class ClientHello:
    """What the proxy needs from a ClientHello: the SNI (lower-case, or None) and ALPN list.

    Example::

        >>> ClientHello(sni="api.example.com", alpn=("h2", "http/1.1")).sni
        'api.example.com'
    """

    sni: str | None
    alpn: tuple[str, ...] = ()


class HelloLike(Protocol):
    """What the proxy reads from a parser's result: ``sni`` and ``alpn``.

    A result with ``complete == False`` (as ``netstack.parse_client_hello`` returns)
    means "need more bytes", like ``None``.

    Example::

        >>> h: HelloLike = ClientHello("a.example", ("h2",))
        >>> h.sni
        'a.example'
    """

    @property
    def sni(self) -> str | None:
        """Server name (lower-case) or None."""
        ...

    @property
    def alpn(self) -> tuple[str, ...]:
        """Offered ALPN protocols."""
        ...


HelloParser = Callable[[bytes], "HelloLike | None"]
"""``parse(first_bytes) -> result | None`` (None or ``complete=False`` = need more bytes);
raises on garbage. ``netstack.parse_client_hello`` fits as is."""


def _handshake_bytes(data: bytes) -> bytes | None:
    """Concatenate handshake-record payloads until one whole handshake message is present."""
    out = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return None
        ctype, major = data[pos], data[pos + 1]
        if ctype != 0x16:
            if pos == 0:
                raise ClientHelloError(
                    f"not a TLS handshake: first byte 0x{ctype:02x} (expected 0x16)"
                )
            raise ClientHelloError(f"record type 0x{ctype:02x} inside a ClientHello")
        if major != 3:
            raise ClientHelloError(f"not a TLS record: version major {major} (expected 3)")
        rlen = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if rlen == 0 or rlen > 16384:
            raise ClientHelloError(f"bad TLS record length {rlen} (allowed 1..16384)")
        if len(data) - pos - 5 < rlen:
            # use what we have so far if the message is complete already
            out += data[pos + 5 :]
            return _complete(out)
        out += data[pos + 5 : pos + 5 + rlen]
        pos += 5 + rlen
        done = _complete(out)
        if done is not None:
            return done


def _complete(buf: bytearray) -> bytes | None:
    if len(buf) < 4:
        return None
    if buf[0] != 1:
        raise ClientHelloError(f"handshake type {buf[0]} is not ClientHello (1)")
    mlen = int.from_bytes(buf[1:4], "big")
    if mlen > MAX_HELLO:
        raise ClientHelloError(f"ClientHello of {mlen} bytes exceeds {MAX_HELLO}")
    if len(buf) - 4 < mlen:
        return None
    return bytes(buf[4 : 4 + mlen])


class _Reader:
    def __init__(self, b: bytes) -> None:
        self.b, self.p = b, 0

    def take(self, n: int) -> bytes:
        if self.p + n > len(self.b):
            raise ClientHelloError("truncated ClientHello")
        v = self.b[self.p : self.p + n]
        self.p += n
        return v

    def u(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vec(self, lenbytes: int) -> bytes:
        return self.take(self.u(lenbytes))

    def done(self) -> bool:
        return self.p >= len(self.b)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the first bytes of a TLS connection; None if more bytes are needed.

    Raises :class:`~tls_proxy.errors.ClientHelloError` for anything that is not a
    well-formed ClientHello (the proxy then closes the connection).

    Example::

        >>> parse_client_hello(b"\\x16\\x03\\x01\\x00")  # too short: need more bytes
    """
    if len(data) > MAX_HELLO * 2:
        data = data[: MAX_HELLO * 2]
    body = _handshake_bytes(data)
    if body is None:
        if len(data) >= MAX_HELLO * 2:
            raise ClientHelloError(f"no complete ClientHello in {len(data)} bytes")
        return None
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vec(1)  # session id
    r.vec(2)  # cipher suites
    r.vec(1)  # compression methods
    sni: str | None = None
    alpn: list[str] = []
    if r.done():
        return ClientHello(None, ())
    ext = _Reader(r.vec(2))
    seen: set[int] = set()
    while not ext.done():
        etype = ext.u(2)
        edata = _Reader(ext.vec(2))
        if etype in seen:
            raise ClientHelloError(f"duplicate extension {etype}")
        seen.add(etype)
        if etype == 0:  # server_name
            names = _Reader(edata.vec(2))
            while not names.done():
                ntype = names.u(1)
                name = names.vec(2)
                if ntype == 0 and sni is None:
                    try:
                        text = name.decode("ascii")
                    except UnicodeDecodeError:
                        raise ClientHelloError("SNI is not ASCII") from None
                    if not text or any(c in text for c in "\x00/\\ \r\n:@") or len(text) > 253:
                        raise ClientHelloError(f"invalid SNI {text[:64]!r}")
                    sni = text.lower().rstrip(".")
        elif etype == 16:  # ALPN
            protos = _Reader(edata.vec(2))
            while not protos.done():
                alpn.append(protos.vec(1).decode("ascii", "replace"))
    return ClientHello(sni or None, tuple(alpn))
