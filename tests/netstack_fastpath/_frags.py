"""IP fragment builders for the fragment tests (classifier, gateway loop, fuzz seeds).

``fragment4`` / ``fragment6`` cut a frame built by :func:`netstack._frameinfo.build_frame`
into fragments the way a sending kernel does; ``frag4`` / ``frag6`` build one fragment
from its parts (for crafted ones: no first fragment, overlapping, tiny).

>>> from netstack import build_frame
>>> parts = fragment4(build_frame("10.0.2.15", "192.0.2.1", "udp", 1, 2, bytes(100)), [64])
>>> [len(p) - 34 for p in parts]
[64, 44]
"""

from __future__ import annotations

import ipaddress
import struct

ETH4 = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
ETH6 = ETH4[:12] + b"\x86\xdd"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return 0xFFFF - s


def frag4(src: str, dst: str, proto: int, ident: int, offset: int, more: bool, piece: bytes,
          *, eth: bytes = ETH4) -> bytes:
    """One IPv4 fragment: ``piece`` at byte ``offset`` (a multiple of 8) of datagram
    ``ident``, MF set if ``more``; header checksum filled in.

    >>> len(frag4("10.0.2.15", "192.0.2.1", 17, 7, 8, False, b"abc"))
    37
    """
    if offset % 8:
        raise ValueError(f"offset must be a multiple of 8, got {offset}")
    hdr = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(piece), ident,
                                (0x2000 if more else 0) | offset // 8, 64, proto, 0))
    hdr += ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    hdr[10:12] = struct.pack("!H", _csum(bytes(hdr)))
    return eth + bytes(hdr) + piece


def frag6(src: str, dst: str, nxt: int, ident: int, offset: int, more: bool, piece: bytes,
          *, before: bytes = b"", before_nxt: int = 44) -> bytes:
    """One IPv6 fragment (fragment header: next header ``nxt``, ``offset``, M if ``more``,
    identification ``ident``); ``before`` is an unfragmentable extension header chain
    placed ahead of it (the fixed header's Next Header is then ``before_nxt``).

    >>> len(frag6("fd00::2", "2001:db8::1", 17, 7, 0, True, bytes(16)))
    78
    """
    fh = struct.pack("!BBHI", nxt, 0, offset | (1 if more else 0), ident)
    body = before + fh + piece
    first = before_nxt if before else 44
    ip = struct.pack("!IHBB", 6 << 28, len(body), first, 64)
    ip += ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return ETH6 + ip + body


def fragment4(frame: bytes, sizes: list[int], ident: int = 0x1234) -> list[bytes]:
    """Cut IPv4 ``frame``'s payload into fragments carrying ``sizes`` bytes (multiples
    of 8), then the rest.

    >>> from netstack import build_frame
    >>> len(fragment4(build_frame("10.0.2.15", "192.0.2.1", "udp", 1, 2, bytes(40)), [8, 16]))
    3
    """
    ip = frame[14:]
    src, dst = str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
    data = ip[(ip[0] & 15) * 4:]
    cuts = [*sizes, len(data) - sum(sizes)]
    out, off = [], 0
    for i, n in enumerate(cuts):
        out.append(frag4(src, dst, ip[9], ident, off, i < len(cuts) - 1, data[off:off + n],
                         eth=frame[:14]))
        off += n
    return out


def fragment6(frame: bytes, sizes: list[int], ident: int = 0x12345678) -> list[bytes]:
    """Cut IPv6 ``frame``'s payload (after the fixed header) into fragments carrying
    ``sizes`` bytes (multiples of 8), then the rest.

    >>> from netstack import build_frame
    >>> len(fragment6(build_frame("fd00::2", "2001:db8::1", "udp", 1, 2, bytes(40)), [16]))
    2
    """
    ip = frame[14:]
    src, dst = str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40]))
    data = ip[40:]
    cuts = [*sizes, len(data) - sum(sizes)]
    out, off = [], 0
    for i, n in enumerate(cuts):
        out.append(frag6(src, dst, ip[6], ident, off, i < len(cuts) - 1, data[off:off + n]))
        off += n
    return out
