"""16-byte address encoding shared with the C side (IPv4 as ::ffff:a.b.c.d)."""

from __future__ import annotations

import ipaddress

from netstack._addresses import AddressLike, IPAddress, normalize_ip

_V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


def ip16(value: AddressLike) -> bytes:
    """Encode an address the way the C code stores it.

    >>> ip16("10.0.0.1").hex()
    '00000000000000000000ffff0a000001'
    """
    ip = normalize_ip(value)
    if isinstance(ip, ipaddress.IPv4Address):
        return _V4_PREFIX + ip.packed
    return ip.packed


def from16(raw: bytes) -> IPAddress:
    """Decode a 16-byte C address (v4-mapped becomes IPv4).

    >>> from16(ip16("192.0.2.1"))
    IPv4Address('192.0.2.1')
    """
    if raw[:12] == _V4_PREFIX:
        return ipaddress.IPv4Address(raw[12:16])
    return ipaddress.IPv6Address(bytes(raw[:16]))
