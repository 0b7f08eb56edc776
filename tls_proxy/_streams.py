"""Byte streams the proxy relays between: plain TCP, server-side TLS over a memory BIO,
and a buffered reader with bounded ``read_until`` for HTTP parsing.

Server-side TLS is driven through :class:`ssl.MemoryBIO` so the ClientHello bytes the
proxy already read (to learn the SNI) are fed into the handshake, not lost.

Example::

    >>> import asyncio
    >>> from tls_proxy._streams import BufferedReader
    >>> class Src:
    ...     def __init__(self): self.parts = [b"GET / HTTP/1.1\\r\\n", b"\\r\\nrest"]
    ...     async def recv(self): return self.parts.pop(0) if self.parts else b""
    >>> asyncio.run(BufferedReader(Src()).read_until(b"\\r\\n\\r\\n", 100))
    b'GET / HTTP/1.1\\r\\n\\r\\n'
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol

from tls_proxy.errors import HttpError

READ_SIZE = 65536


class Source(Protocol):
    """Anything with ``async recv() -> bytes`` returning ``b""`` at end of stream.

    Example::

        >>> src: Source = TcpStream(reader, writer)  # doctest: +SKIP
    """

    async def recv(self) -> bytes:
        """Next bytes, or ``b""`` at EOF."""
        ...


class TcpStream:
    """An asyncio (reader, writer) pair as a duplex byte stream.

    Example::

        >>> s = TcpStream(*await asyncio.open_connection("127.0.0.1", 443))  # doctest: +SKIP
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> bytes:
        """Up to 64 KiB; ``b""`` at EOF (a reset counts as EOF)."""
        try:
            return await self.reader.read(READ_SIZE)
        except (ConnectionError, ssl.SSLError, OSError):
            return b""

    def send(self, data: bytes) -> None:
        """Queue ``data`` for writing (call :meth:`drain` for back-pressure)."""
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        """Wait until the write buffer is below the high-water mark."""
        try:
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError, OSError) as e:
            raise ConnectionResetError(f"peer went away: {e.__class__.__name__}") from None

    def shutdown_write(self) -> None:
        """Half-close (FIN) when the transport supports it."""
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
        except (OSError, RuntimeError):
            pass

    def close(self) -> None:
        """Close the connection (idempotent)."""
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass


class TlsServerStream:
    """Server-side TLS over a :class:`TcpStream`, fed with already-read ClientHello bytes.

    Example::

        >>> tls = TlsServerStream(tcp, ctx, first_bytes)   # doctest: +SKIP
        >>> await tls.handshake(timeout=10)                # doctest: +SKIP
    """

    def __init__(self, tcp: TcpStream, ctx: ssl.SSLContext, initial: bytes = b"") -> None:
        self.tcp = tcp
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        if initial:
            self._in.write(initial)
        self._eof = False

    def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            self.tcp.send(pending)

    async def handshake(self, timeout: float) -> None:
        """Complete the TLS handshake or raise ``ssl.SSLError``/``TimeoutError``."""

        async def run() -> None:
            while True:
                try:
                    self.obj.do_handshake()
                    self._flush()
                    return
                except ssl.SSLWantReadError:
                    self._flush()
                    await self.tcp.drain()
                    data = await self.tcp.recv()
                    if not data:
                        raise ConnectionResetError("client closed during the TLS handshake")
                    self._in.write(data)

        await asyncio.wait_for(run(), timeout)
        await self.tcp.drain()

    @property
    def alpn(self) -> str | None:
        """The negotiated ALPN protocol, if any."""
        return self.obj.selected_alpn_protocol()

    async def recv(self) -> bytes:
        """Decrypted bytes, ``b""`` at EOF (close_notify, TCP EOF or a TLS error)."""
        while not self._eof:
            try:
                data = self.obj.read(READ_SIZE)
                if data:
                    return data
                self._eof = True
            except ssl.SSLWantReadError:
                self._flush()
                raw = await self.tcp.recv()
                if not raw:
                    self._eof = True
                    break
                self._in.write(raw)
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                self._eof = True
        return b""

    def send(self, data: bytes) -> None:
        """Encrypt and queue ``data``."""
        if not data:
            return
        try:
            self.obj.write(data)
        except ssl.SSLError as e:
            raise ConnectionResetError(f"TLS write failed: {e.__class__.__name__}") from None
        self._flush()

    async def drain(self) -> None:
        """Back-pressure from the underlying TCP stream."""
        await self.tcp.drain()

    def shutdown_write(self) -> None:
        """Send close_notify (best effort)."""
        try:
            self.obj.unwrap()
        except ssl.SSLError:
            pass
        self._flush()

    def close(self) -> None:
        """Send close_notify when possible and close the TCP connection."""
        if not self.tcp.writer.is_closing():
            self.shutdown_write()
        self.tcp.close()


class Duplex(Source, Protocol):
    """A :class:`Source` that can also be written to and closed.

    Example::

        >>> conn: Duplex = TlsServerStream(tcp, ctx)  # doctest: +SKIP
    """

    def send(self, data: bytes) -> None:
        """Queue bytes."""
        ...

    async def drain(self) -> None:
        """Wait for the write buffer to drain."""
        ...

    def shutdown_write(self) -> None:
        """Half-close."""
        ...

    def close(self) -> None:
        """Close."""
        ...


class BufferedReader:
    """Buffering on top of a :class:`Source` with bounded reads for message parsing.

    ``idle_timeout`` bounds every wait for more bytes (:class:`HttpError` 408).

    Example::

        >>> line = await BufferedReader(src).read_until(b"\\r\\n", 8192)  # doctest: +SKIP
    """

    def __init__(self, src: Source, initial: bytes = b"", idle_timeout: float | None = None) -> None:
        self.src = src
        self.buf = bytearray(initial)
        self.eof = False
        self.idle_timeout = idle_timeout

    async def _fill(self) -> bool:
        if self.eof:
            return False
        if self.idle_timeout is None:
            data = await self.src.recv()
        else:
            try:
                data = await asyncio.wait_for(self.src.recv(), self.idle_timeout)
            except TimeoutError:
                raise HttpError(408, f"no data for {self.idle_timeout:g} s") from None
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def read_until(self, sep: bytes, limit: int, status: int = 431) -> bytes:
        """Bytes up to and including ``sep``; ``b""`` at clean EOF before any byte.

        Raises :class:`HttpError` (``status``) when ``limit`` bytes pass without ``sep``,
        or 400 on EOF in the middle.
        """
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                end = i + len(sep)
                if end > limit:
                    raise HttpError(status, f"message head larger than {limit} bytes")
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise HttpError(status, f"message head larger than {limit} bytes")
            start = max(0, len(self.buf) - len(sep) + 1)
            if not await self._fill():
                if self.buf:
                    raise HttpError(400, "connection closed in the middle of a message")
                return b""

    async def read_some(self, n: int = READ_SIZE) -> bytes:
        """Up to ``n`` bytes (buffered first); ``b""`` at EOF."""
        if not self.buf and not await self._fill():
            return b""
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes or :class:`HttpError` 400 at early EOF."""
        while len(self.buf) < n:
            if not await self._fill():
                raise HttpError(400, f"connection closed with {n - len(self.buf)} bytes missing")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out
