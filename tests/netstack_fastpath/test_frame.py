"""Frame parser: Ethernet/802.1Q, ARP, IPv4 (options, fragments), IPv6 extension walk, L4."""

from __future__ import annotations

import ipaddress
import random
import struct

import dpkt
import pytest

from netstack import MalformedFrame, build_frame, parse_frame

ETH = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"


def ipv6(nh: int, ext: bytes, l4: bytes, src: str = "2001:db8::1", dst: str = "2001:db8::2") -> bytes:
    hdr = struct.pack("!IHBB", 6 << 28, len(ext) + len(l4), nh, 64)
    return ETH + b"\x86\xdd" + hdr + ipaddress.IPv6Address(src).packed + \
        ipaddress.IPv6Address(dst).packed + ext + l4


def test_tcp_udp_icmp_v4_v6() -> None:
    f = parse_frame(build_frame("10.0.2.15", "192.0.2.1", "tcp", 1234, 443, b"abc", flags=0x12))
    assert (f.l3, f.protocol, f.sport, f.dport, f.tcp_flags, f.payload_length) == (
        "ipv4", "tcp", 1234, 443, 0x12, 3)
    f = parse_frame(build_frame("2001:db8::1", "2001:db8::2", "udp", 5, 53, b"q"))
    assert (f.l3, f.protocol, str(f.dst), f.dport, f.payload_length) == ("ipv6", "udp", "2001:db8::2", 53, 1)
    assert parse_frame(build_frame("10.0.0.1", "10.0.0.2", "icmpv4")).protocol == "icmpv4"
    f = parse_frame(build_frame("fe80::1", "ff02::1", "icmpv6"))
    assert (f.protocol, f.sport) == ("icmpv6", None)


def test_vlan_tag_and_ipv4_options_and_padding() -> None:
    frame = build_frame("10.0.2.15", "192.0.2.1", "udp", 7, 8, b"xy")
    tagged = frame[:12] + b"\x81\x00\x00\x05" + frame[12:]
    assert parse_frame(tagged).dport == 8
    double = frame[:12] + b"\x81\x00\x00\x05\x81\x00\x00\x06" + frame[12:]
    with pytest.raises(MalformedFrame):
        parse_frame(double)
    # IPv4 with 8 bytes of options (IHL 7)
    ip = bytearray(frame[14:])
    opts = b"\x01\x01\x01\x00" * 2
    new = bytes([0x47]) + ip[1:2] + struct.pack("!H", len(ip) + 8) + ip[4:20] + opts + ip[20:]
    f = parse_frame(frame[:14] + new + b"\0" * 12)  # plus Ethernet padding
    assert (f.sport, f.dport, f.payload_length) == (7, 8, 2)


def test_ipv6_extension_headers_and_bound() -> None:
    udp = struct.pack("!HHHH", 1000, 53, 9, 0) + b"q"
    hop = bytes([60, 0]) + bytes(6)         # hop-by-hop -> destination options
    dst = bytes([17, 0]) + bytes(6)         # destination options -> UDP
    f = parse_frame(ipv6(0, hop + dst, udp))
    assert (f.protocol, f.dport) == ("udp", 53)
    # fragment header (first fragment, M=1)
    frag = bytes([17, 0]) + struct.pack("!HI", 1, 0xABCD)
    f = parse_frame(ipv6(44, frag, udp))
    assert (f.fragment, f.dport) == (1, 53)
    later = bytes([17, 0]) + struct.pack("!HI", 8 << 3, 0xABCD)
    assert parse_frame(ipv6(44, later, b"xxxxxxxx")).fragment == 2
    chain = b"".join(bytes([60, 0]) + bytes(6) for _ in range(8)) + bytes([17, 0]) + bytes(6)
    with pytest.raises(MalformedFrame):
        parse_frame(ipv6(60, chain, udp))   # 9 extension headers: over the bound
    ok = b"".join(bytes([60, 0]) + bytes(6) for _ in range(7)) + bytes([17, 0]) + bytes(6)
    assert parse_frame(ipv6(60, ok, udp)).dport == 53


def test_arp_and_other_ethertypes() -> None:
    arp = ETH + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + bytes(6) + \
        bytes([10, 0, 2, 15]) + bytes(6) + bytes([10, 0, 2, 2])
    f = parse_frame(arp)
    assert (f.l3, str(f.src), str(f.dst)) == ("arp", "10.0.2.15", "10.0.2.2")
    assert parse_frame(ETH + b"\x88\xcc" + bytes(40)).l3 == "other"
    with pytest.raises(MalformedFrame):
        parse_frame(ETH + b"\x05\xdc" + bytes(40))  # an 802.3 length, not Ethernet II


def test_inconsistent_lengths_are_malformed() -> None:
    frame = bytearray(build_frame("10.0.2.15", "192.0.2.1", "tcp", 1, 2, b"abcd"))
    bad_total = bytearray(frame)
    bad_total[16:18] = (2000).to_bytes(2, "big")
    bad_ihl = bytearray(frame)
    bad_ihl[14] = 0x44
    bad_doff = bytearray(frame)
    bad_doff[14 + 20 + 12] = 0xF0
    bad_ver = bytearray(frame)
    bad_ver[14] = 0x65
    for bad in (bad_total, bad_ihl, bad_doff, bad_ver):
        with pytest.raises(MalformedFrame):
            parse_frame(bytes(bad))
    with pytest.raises(MalformedFrame, match="exceeds"):
        parse_frame(bytes(65550))


def test_every_truncation_is_handled() -> None:
    frames = [
        build_frame("10.0.2.15", "192.0.2.1", "tcp", 1, 2, b"abcd"),
        build_frame("2001:db8::1", "2001:db8::2", "udp", 1, 2, b"abcd"),
        ipv6(0, bytes([44, 0]) + bytes(6) + bytes([17, 0]) + struct.pack("!HI", 1, 7),
             struct.pack("!HHHH", 1, 2, 8, 0)),
    ]
    for frame in frames:
        parse_frame(frame)
        for cut in range(len(frame)):
            try:
                parse_frame(frame[:cut])
            except MalformedFrame:
                continue


def test_agrees_with_dpkt_on_random_frames() -> None:
    rng = random.Random(1)
    for _ in range(500):
        v6 = rng.random() < 0.5
        src = f"2001:db8::{rng.randrange(1, 65535):x}" if v6 else f"10.0.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        dst = f"2001:db8:1::{rng.randrange(1, 65535):x}" if v6 else f"192.0.2.{rng.randrange(1, 255)}"
        proto = rng.choice(("tcp", "udp"))
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        frame = build_frame(src, dst, proto, rng.randrange(65536), rng.randrange(65536), payload)
        ours = parse_frame(frame)
        eth = dpkt.ethernet.Ethernet(frame)
        l4 = eth.data.data
        assert (ours.sport, ours.dport) == (l4.sport, l4.dport)
        assert ours.payload_length == len(l4.data)
        assert str(ours.dst) == str(ipaddress.ip_address(eth.data.dst))
