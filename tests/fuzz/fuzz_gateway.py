#!/usr/bin/env python3
"""atheris target: the C gateway loop's frame handling.

    python3 tests/fuzz/fuzz_gateway.py -max_total_time=60

Each input is (1) answered with ``ns_gw_build_reject`` (the RST / ICMP unreachable
builder), (2) looked up as an uplink frame (``ns_ctx_reply_lookup``, including the
ICMP-error quote parser) and as a guest frame answering an ingress flow, and (3) sent
as one frame to a running gateway loop from both sides (guest stream socket and the
uplink), whose policy has domain rules (so frames are held and released) and a
published port. The loop's guest link (65520) is larger than its uplink (1500), so big
frames take the GSO path, the IPv4 fragmenter or the ICMP "fragmentation needed" /
ICMPv6 "packet too big" builder (also called directly, ``ns_gw_build_too_big``, with an
MTU and a source address taken from the input); a second loop on a plain uplink of MTU
576 fragments into many pieces. Seeds for those paths (oversize IPv4 with and without
DF, with options, a first fragment, IPv6 with an extension header, an ICMP error) and
for the fragment table (first and later fragments of one datagram from the guest and as
replies from the uplink, IPv4 and IPv6, overlapping, stray and tiny ones: consecutive
inputs share the loops' and the lookup context's tables) are written into the output
corpus directory (a scratch one by default). Runs against the
ASan+UBSan build (see _netstack_asan.py): a memory error in the loop thread aborts the
run.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _netstack_asan import bootstrap, fuzz_args

atheris = bootstrap()

from netstack import Classifier, NetworkPolicy, PinCache, Rule  # noqa: E402
from netstack._fastpath import ffi, lib  # noqa: E402

PINS = PinCache(max_bindings=64)
PINS.pin("example.com", ["192.0.2.9", "2001:db8::9"], ttl=1e6, now=0.0)
POLICY = NetworkPolicy(default_egress="deny", default_ingress="allow", rules=(
    Rule.deny(destination=".blocked.example"),
    Rule.allow(destination="example.com", protocol="tcp", port=443),
    Rule.allow(destination="public"),
))
LOOKUP = Classifier(POLICY, gateway=["10.0.2.2"], pins=PINS, max_flows=64, intercept_ports=())
LOOP_CLS = Classifier(POLICY, gateway=["10.0.2.2"], pins=PINS, max_flows=64,
                      intercept_ports=(), hello_timeout=0.05)
VMM, MINE = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
NS_END, TAP_END = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for s in (VMM, NS_END):
    s.setblocking(False)
CFG = ffi.new("ns_gw_config *")
CFG.guest_fd, CFG.guest_mode, CFG.uplink_fd = MINE.fileno(), 0, TAP_END.fileno()
CFG.event_slots, CFG.hello_timeout, CFG.log_denied, CFG.capture = 64, 0.05, 1, 1
CFG.npublished = 1
CFG.published[0] = 8000
CFG.npublished_udp = 1
CFG.published_udp[0] = 5300
# a vnet-header uplink and a large-MTU guest link: uplink input starts with a (fuzzed)
# virtio-net header; big guest TCP frames take the GSO path, SYNs the MSS rewrite
CFG.uplink_vnet, CFG.guest_mtu, CFG.uplink_mtu = 1, 65520, 1500
GW_V4 = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.2.2")
GW_V6 = socket.inet_pton(socket.AF_INET6, "fd42:6d73:62::1")
ffi.memmove(CFG.gateway_ip, GW_V4, 16)
ffi.memmove(CFG.gateway_ip6, GW_V6, 16)
GW = lib.ns_gw_new(LOOP_CLS.handle, CFG)
assert GW != ffi.NULL and lib.ns_gw_start(GW) == 0
# a plain uplink (no virtio-net header) of MTU 576: many fragments, TCP answered with ICMP
SMALL_CLS = Classifier(POLICY, gateway=["10.0.2.2"], pins=PINS, max_flows=64,
                       intercept_ports=(), hello_timeout=0.05)
VMM2, MINE2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
NS_END2, TAP_END2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for s in (VMM2, NS_END2):
    s.setblocking(False)
CFG2 = ffi.new("ns_gw_config *")
CFG2.guest_fd, CFG2.guest_mode, CFG2.uplink_fd = MINE2.fileno(), 1, TAP_END2.fileno()
CFG2.event_slots, CFG2.hello_timeout, CFG2.log_denied = 64, 0.05, 1
CFG2.guest_mtu, CFG2.uplink_mtu, CFG2.dns_tcp_reset = 9000, 576, 1
GW2 = lib.ns_gw_new(SMALL_CLS.handle, CFG2)
assert GW2 != ffi.NULL and lib.ns_gw_start(GW2) == 0
OUT = ffi.new("uint8_t[]", 2048)
EV = ffi.new("ns_gw_event *")
COUNT = [0]


def _ip4(src: str, dst: str, proto: int, l4: bytes, *, df: bool, options: bytes = b"",
         frag: int = 0) -> bytes:
    ihl = 20 + len(options)
    ip = struct.pack("!BBHHHBBH", 0x40 | ihl // 4, 0, ihl + len(l4), 7,
                     (0x4000 if df else 0) | frag, 64, proto, 0) + \
        socket.inet_aton(src) + socket.inet_aton(dst) + options
    return b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00" + ip + l4


def _ip6(src: str, dst: str, nxt: int, l4: bytes) -> bytes:
    ip = struct.pack("!IHBB", 6 << 28, len(l4), nxt, 64) + \
        socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    return b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x86\xdd" + ip + l4


def too_big_seeds() -> list[bytes]:
    """Frames larger than the loops' uplinks, one per too-big path."""
    g, r, g6, r6 = "10.0.2.15", "192.0.2.9", "fd42:6d73:62::2", "2001:db8::9"
    udp = struct.pack("!HHHH", 5000, 6000, 8 + 3000, 0) + bytes(range(256)) * 11 + bytes(184)
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 1, 5 << 4, 0x10, 65535, 0, 0) + bytes(3000)
    icmp_err = struct.pack("!BBHI", 3, 1, 0, 0) + bytes(3000)
    opts = b"\x94\x04\x00\x00\x07\x07\x04" + bytes(4) + b"\x00"
    return [
        _ip4(g, r, 17, udp, df=True),                      # frag-needed
        _ip4(g, r, 17, udp, df=False),                     # fragmented
        _ip4(g, r, 17, udp, df=False, options=opts),       # fragmented, copied options
        _ip4(g, r, 17, udp, df=False, frag=0x2000),        # a first fragment, cut again
        _ip4(g, r, 6, tcp, df=True),                       # GSO (vnet) / frag-needed (plain)
        _ip4(g, r, 1, icmp_err, df=True),                  # an ICMP error: no answer
        _ip4(g, "239.1.2.3", 17, udp, df=True),            # multicast: no answer
        _ip6(g6, r6, 17, udp),                             # packet too big
        _ip6(g6, r6, 0, b"\x06\x00" + bytes(6) + tcp),     # hop-by-hop + TCP: too big
    ]


def _frag4(src: str, dst: str, proto: int, ident: int, off: int, more: bool,
           piece: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(piece), ident,
                     (0x2000 if more else 0) | off // 8, 64, proto, 0)
    return b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00" + ip + \
        socket.inet_aton(src) + socket.inet_aton(dst) + piece


def _frag6(src: str, dst: str, nxt: int, ident: int, off: int, more: bool,
           piece: bytes) -> bytes:
    return _ip6(src, dst, 44, struct.pack("!BBHI", nxt, 0, off | int(more), ident) + piece)


def fragment_seeds() -> list[bytes]:
    """First and later fragments of allowed datagrams both ways, and crafted ones."""
    g, r, g6, r6 = "10.0.2.15", "192.0.2.9", "fd42:6d73:62::2", "2001:db8::9"
    udp = struct.pack("!HHHH", 5000, 6000, 8 + 3000, 0) + bytes(3000)
    back = struct.pack("!HHHH", 6000, 5000, 8 + 3000, 0) + bytes(3000)
    ping = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + bytes(3000)
    return [
        _frag4(g, r, 17, 40, 0, True, udp[:1480]),          # guest: first fragment
        _frag4(g, r, 17, 40, 1480, False, udp[1480:]),      # ... and the rest
        _frag4(g, r, 1, 41, 0, True, ping[:1480]),          # a fragmented ping
        _frag4(r, g, 17, 42, 0, True, back[:1480]),         # uplink: a reply's first
        _frag4(r, g, 17, 42, 1480, False, back[1480:]),     # ... and the rest
        _frag4(r, g, 17, 42, 8, False, bytes(64)),          # overlapping the first
        _frag4(r, g, 17, 43, 65528, False, bytes(64)),      # past 65,535
        _frag4(g, r, 6, 44, 0, True, bytes(8)),             # tiny TCP first fragment
        _frag6(g6, r6, 17, 45, 0, True, udp[:1448]),        # IPv6 first and rest
        _frag6(g6, r6, 17, 45, 1448, False, udp[1448:]),
        _frag6(r6, g6, 60, 46, 0, True, b"\x11\x00" + bytes(6) + back[:1440]),
        _frag6(r6, g6, 60, 46, 1448, False, back[1440:]),   # Next Header: dest options
    ]


def _with_seeds(args: list[str]) -> list[str]:
    """Write the too-big and fragment seeds into the output corpus (the first directory argument: a
    scratch or caller-given directory, never the checked-in corpus)."""
    dirs = [a for a in args[1:] if not a.startswith("-")]
    corpus_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    if dirs and os.path.isdir(dirs[0]) and \
            not os.path.abspath(dirs[0]).startswith(corpus_root + os.sep):
        for name, seeds in (("too-big", too_big_seeds()), ("fragment", fragment_seeds())):
            for i, seed in enumerate(seeds):
                with open(os.path.join(dirs[0], f"{name}-{i}"), "wb") as f:
                    f.write(seed)
    return args


def _drain() -> None:
    while lib.ns_gw_next_event(GW, EV, OUT, 2048):
        pass
    while lib.ns_gw_next_event(GW2, EV, OUT, 2048):
        pass
    for s in (VMM, NS_END, VMM2, NS_END2):
        try:
            while s.recv(1 << 20):
                pass
        except (BlockingIOError, OSError):
            pass


def TestOneInput(data: bytes) -> None:
    n = lib.ns_gw_build_reject(data, len(data), OUT, 2048)
    assert n <= 2048
    mtu = 68 + (data[-1] * 257 if data else 0)             # 68..65603: clamped by the builder
    src = (ffi.NULL, GW_V4, GW_V6, bytes(16))[len(data) & 3]
    n = lib.ns_gw_build_too_big(data, len(data), mtu, src, OUT, 2048)
    assert n <= 2048
    now = time.monotonic()
    lib.ns_ctx_reply_lookup(LOOKUP.handle, data, len(data), now)
    lib.ns_ctx_ingress_reply(LOOKUP.handle, data, len(data), now)
    LOOKUP.classify([data], now=now)
    if 0 < len(data) <= 65549:
        try:
            VMM.send(struct.pack("!I", len(data)) + data)
            NS_END.send(data)
        except (BlockingIOError, OSError):
            pass
        try:
            VMM2.send(data)
        except (BlockingIOError, OSError):
            pass
    COUNT[0] += 1
    if COUNT[0] % 32 == 0:
        _drain()


def main() -> None:
    atheris.Setup(_with_seeds(fuzz_args(sys.argv, "frame")), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
