"""One-frame parsing through the C parser (for tests, tools and fuzzing).

The packet loop never calls this; it is the same parser the batch API uses.

>>> from netstack import build_frame, parse_frame
>>> info = parse_frame(build_frame("10.0.0.2", "192.0.2.7", "tcp", 40000, 443, flags=0x02))
>>> info.protocol, str(info.dst), info.dport, info.tcp_flags
('tcp', '192.0.2.7', 443, 2)
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from netstack._addresses import AddressLike, IPAddress, normalize_ip
from netstack._fastpath import ffi, lib
from netstack._ipbytes import from16
from netstack.errors import MalformedFrame

_PROTO = {1: "tcp", 2: "udp", 4: "icmpv4", 8: "icmpv6"}
_L3 = {1: "arp", 4: "ipv4", 6: "ipv6", 9: "other"}


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """Parsed headers of one Ethernet frame.

    ``l3`` is ``"arp"``, ``"ipv4"``, ``"ipv6"`` or ``"other"``; ``protocol`` the
    policy protocol (``tcp``/``udp``/``icmpv4``/``icmpv6``) or ``None``;
    ``fragment`` 0 (none), 1 (first fragment) or 2 (later fragment).

    >>> FrameInfo("other", 0x88cc, None, None, None, 0, None, None, 0, 0, 0, 0, 0).l3
    'other'
    """

    l3: str
    ethertype: int
    src: IPAddress | None
    dst: IPAddress | None
    protocol: str | None
    ipproto: int
    sport: int | None
    dport: int | None
    tcp_flags: int
    seq: int
    fragment: int
    payload_offset: int
    payload_length: int


def parse_frame(frame: bytes | bytearray | memoryview) -> FrameInfo:
    """Parse one Ethernet frame (up to 65,549 bytes).

    Raises :class:`~netstack.MalformedFrame` for truncated or inconsistent frames.

    >>> parse_frame(bytes(12) + b"\\x88\\xcc" + bytes(46)).l3
    'other'
    """
    data = ffi.from_buffer("uint8_t[]", frame)
    out = ffi.new("ns_frame *")
    rc = lib.ns_parse_frame(data, len(data), out)
    if rc == 2:
        raise MalformedFrame(f"frame of {len(data)} bytes exceeds the {lib.NS_MAX_FRAME}-byte limit")
    if rc != 0:
        raise MalformedFrame(
            f"malformed frame ({len(data)} bytes): truncated or inconsistent headers")
    ip = out.l3 in (1, 4, 6)
    return FrameInfo(
        l3=_L3.get(out.l3, "other"),
        ethertype=int(out.ethertype),
        src=from16(bytes(out.src)) if ip else None,
        dst=from16(bytes(out.dst)) if ip else None,
        protocol=_PROTO.get(out.pbit),
        ipproto=int(out.ipproto),
        sport=int(out.sport) if out.has_ports else None,
        dport=int(out.dport) if out.has_ports else None,
        tcp_flags=int(out.tcp_flags),
        seq=int(out.seq),
        fragment=int(out.frag),
        payload_offset=int(out.payload_off),
        payload_length=int(out.payload_len),
    )


def build_frame(src: AddressLike, dst: AddressLike, protocol: str, sport: int = 0,
                dport: int = 0, payload: bytes = b"", *, flags: int = 0x18, seq: int = 1000,
                icmp_type: int = 8) -> bytes:
    """Build an Ethernet frame (test, tool and benchmark helper; checksums left zero).

    >>> from netstack import build_frame
    >>> len(build_frame("10.0.0.2", "10.0.0.1", "udp", 5000, 53, b"x"))
    43
    >>> build_frame("10.0.0.2", "10.0.0.1", "sctp")
    Traceback (most recent call last):
    ...
    netstack.errors.MalformedFrame: protocol must be tcp, udp, icmpv4 or icmpv6, got 'sctp'
    """
    s, d = normalize_ip(src), normalize_ip(dst)
    v6 = isinstance(s, ipaddress.IPv6Address)
    if protocol == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
        proto = 6
    elif protocol == "udp":
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        proto = 17
    elif protocol in ("icmpv4", "icmpv6"):
        l4 = struct.pack("!BBHHH", icmp_type, 0, 0, 1, 1) + payload
        proto = 1 if protocol == "icmpv4" else 58
    else:
        raise MalformedFrame(f"protocol must be tcp, udp, icmpv4 or icmpv6, got {protocol!r}")
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02"
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + s.packed + d.packed
        return eth + b"\x86\xdd" + ip + l4
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0) + s.packed + d.packed
    return eth + b"\x08\x00" + ip + l4
