"""TLS ClientHello parsing (SNI, ALPN, ECH) in C, with reassembly across records.

>>> import ssl
>>> from netstack import parse_client_hello
>>> ctx = ssl.create_default_context()
>>> ctx.set_alpn_protocols(["h2", "http/1.1"])
>>> wire = ssl.MemoryBIO()
>>> tls = ctx.wrap_bio(ssl.MemoryBIO(), wire, server_hostname="example.com")
>>> try:
...     tls.do_handshake()
... except ssl.SSLWantReadError:      # the ClientHello is written, the reply is awaited
...     pass
>>> hello = wire.read()
>>> info = parse_client_hello(hello)
>>> info.complete, info.sni, info.alpn, info.ech
(True, 'example.com', ('h2', 'http/1.1'), False)
>>> parse_client_hello(hello[:40]).complete   # the rest is still to come
False
"""

from __future__ import annotations

from dataclasses import dataclass

from netstack._fastpath import ffi, lib
from netstack.errors import MalformedHello

#: Default byte cap: how much of a stream is buffered looking for a ClientHello.
DEFAULT_HELLO_CAP = 16384

_STATUS = {0: "complete", 1: "need-more", 2: "not-tls", 3: "malformed", 4: "too-big"}


@dataclass(frozen=True, slots=True)
class ClientHelloInfo:
    """What the first flight of a TLS connection says.

    ``complete`` is False while more bytes are needed (then the other fields are
    empty); ``sni`` is lowercased without a trailing dot (``None`` if absent);
    ``alpn`` the offered protocols in order; ``ech`` whether an
    encrypted_client_hello extension is present (the SNI is then the outer,
    public name); ``length`` how many stream bytes the hello occupied.

    >>> ClientHelloInfo(False).sni is None
    True
    """

    complete: bool
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    ech: bool = False
    length: int = 0


def parse_client_hello(buf: bytes | bytearray | memoryview, *,
                       cap: int = DEFAULT_HELLO_CAP) -> ClientHelloInfo:
    """Parse the ClientHello at the start of a TCP stream.

    ``buf`` holds the first bytes the client sent (any number of TLS records,
    reassembled across TCP segments).  Returns ``complete=False`` while the
    hello is unfinished.  Raises :class:`~netstack.MalformedHello` for bytes that
    are not TLS, a broken hello, or one longer than ``cap`` bytes.

    >>> parse_client_hello(b"\\x16\\x03\\x01").complete
    False
    >>> parse_client_hello(b"SSH-2.0-OpenSSH_9.2\\r\\n")
    Traceback (most recent call last):
    netstack.errors.MalformedHello: not a TLS handshake record (first byte 0x53, expected 0x16)
    """
    if not isinstance(cap, int) or not 64 <= cap <= 65536:
        raise MalformedHello(f"cap must be an integer 64..65536, got {cap!r}")
    data = ffi.from_buffer("uint8_t[]", buf)
    out = ffi.new("ns_hello *")
    rc = lib.ns_parse_client_hello(data, len(data), cap, out)
    if rc == 1:
        return ClientHelloInfo(False)
    if rc == 2:
        first = bytes(buf[:2])
        if first[:1] != b"\x16":
            raise MalformedHello(
                f"not a TLS handshake record (first byte 0x{first[0]:02x}, expected 0x16)")
        raise MalformedHello(f"not a TLS handshake record (version byte 0x{first[1]:02x})")
    if rc == 3:
        raise MalformedHello(f"malformed TLS ClientHello in the first {len(data)} bytes")
    if rc == 4:
        raise MalformedHello(f"no complete ClientHello within the {cap}-byte cap")
    sni = bytes(ffi.buffer(out.sni, out.sni_len)).decode("ascii") if out.has_sni else None
    alpn = tuple(
        bytes(ffi.buffer(out.alpn_buf + out.alpn_off[i], out.alpn_len[i])).decode("latin-1")
        for i in range(out.alpn_count)
    )
    return ClientHelloInfo(True, sni, alpn, bool(out.ech), int(out.consumed))

