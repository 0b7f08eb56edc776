"""Decompressed views of request bodies, for scanning only (what is forwarded is unchanged).

``gzip``/``x-gzip``/``deflate`` bodies are inflated chunk by chunk with a bounded
output per step (no zip-bomb buffering) and a total cap; multi-member gzip is
followed. Other codings cannot be inspected and are reported as such.

Example::

    >>> import gzip
    >>> d = BodyDecoder.for_coding(b"gzip")
    >>> b"".join(d.feed(gzip.compress(b"hello")))
    b'hello'
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from tls_proxy.errors import HttpError

STEP = 1 << 20
MAX_INFLATED = 256 << 20


class BodyDecoder:
    """Streaming inflater for one ``Content-Encoding`` (gzip or deflate).

    Example::

        >>> import zlib
        >>> b"".join(BodyDecoder.for_coding(b"deflate").feed(zlib.compress(b"abc")))
        b'abc'
    """

    def __init__(self, wbits: int) -> None:
        self.wbits = wbits
        self._d = zlib.decompressobj(wbits)
        self.total = 0

    @classmethod
    def for_coding(cls, coding: bytes) -> BodyDecoder:
        """A decoder for ``coding`` or :class:`HttpError` 415 when it cannot be inspected."""
        c = coding.strip().lower()
        if c in (b"gzip", b"x-gzip"):
            return cls(16 + zlib.MAX_WBITS)
        if c == b"deflate":
            return cls(zlib.MAX_WBITS)  # zlib-wrapped, per RFC 9110
        raise HttpError(
            415, f"cannot inspect Content-Encoding {c[:30].decode('latin-1')!r} for "
            "secret placeholders",
        )

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Inflated pieces of ``data`` (each at most 1 MiB)."""
        pending = data
        try:
            while pending:
                out = self._d.decompress(pending, STEP)
                pending = self._d.unconsumed_tail
                if out:
                    self.total += len(out)
                    if self.total > MAX_INFLATED:
                        raise HttpError(413, f"compressed body inflates beyond {MAX_INFLATED} "
                                        "bytes; cannot inspect it")
                    yield out
                if self._d.eof:
                    rest = self._d.unused_data
                    self._d = zlib.decompressobj(self.wbits)
                    pending = rest + pending
                elif not out and not pending:
                    break
        except zlib.error:
            raise HttpError(400, "body does not match its Content-Encoding") from None
