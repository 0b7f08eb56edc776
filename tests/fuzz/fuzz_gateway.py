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
576 fragments into many pieces; a third loop has a stream uplink (passt's framing) with
the steering NAT on (``steer.c``: TLS ports and DNS over TCP to loopback listener pools,
guest traffic to the gateway address dropped), fed from both sides, its pending flows
claimed by port between inputs. Seeds for those paths (oversize IPv4 with and without
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
# a stream uplink (passt --fd framing) with the steering NAT: TLS to 443/8443 and TCP/53
STEER_CLS = Classifier(POLICY, gateway=["10.0.2.2"], pins=PINS, max_flows=64,
                       intercept_ports=(), hello_timeout=0.05)
VMM3, MINE3 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
NS_END3, UP_END3 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
for s in (VMM3, NS_END3):  # blocking with a timeout: a partial frame would end the stream
    s.settimeout(1.0)
CFG3 = ffi.new("ns_gw_config *")
CFG3.guest_fd, CFG3.guest_mode, CFG3.uplink_fd = MINE3.fileno(), 0, UP_END3.fileno()
CFG3.event_slots, CFG3.hello_timeout, CFG3.log_denied = 64, 0.05, 1
CFG3.uplink_stream, CFG3.guest_mtu, CFG3.uplink_mtu = 1, 65520, 65520
CFG3.npublished = 1
CFG3.published[0] = 8000
ffi.memmove(CFG3.gateway_ip, GW_V4, 16)
ffi.memmove(CFG3.gateway_ip6, GW_V6, 16)
GW3 = lib.ns_gw_new(STEER_CLS.handle, CFG3)
assert GW3 != ffi.NULL
STEER = ffi.new("ns_gw_steer_config *")
ffi.memmove(STEER.gateway_ip, GW_V4, 16)
ffi.memmove(STEER.gateway_ip6, GW_V6, 16)
STEER.dns, STEER.ndns_pool = 1, 2
STEER.dns_pool[0], STEER.dns_pool[1] = 5353, 5354
STEER.ntls_ports, STEER.tls_ports[0], STEER.tls_ports[1] = 2, 443, 8443
STEER.ntls_pool, STEER.block_udp = 4, 1
for _i in range(4):
    STEER.tls_pool[_i] = 40001 + _i
assert lib.ns_gw_steer_enable(GW3, STEER) == 0 and lib.ns_gw_start(GW3) == 0
CLAIM_DST = ffi.new("uint8_t[16]")
CLAIM_PORT = ffi.new("uint16_t *")
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


def _tcp(sport: int, dport: int, flags: int, seq: int = 1) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)


def steer_seeds() -> list[bytes]:
    """Guest flows the steering NAT rewrites (and drops), and listener replies."""
    g, r, gw, g6, r6 = "10.0.2.15", "192.0.2.9", "10.0.2.2", "fd42:6d73:62::2", "2001:db8::9"
    gw6 = "fd42:6d73:62::1"
    return [
        _ip4(g, r, 6, _tcp(40000, 443, 0x02), df=True),                 # TLS SYN: steered
        _ip4(gw, g, 6, _tcp(40001, 40000, 0x12), df=True),              # the listener's SYN-ACK
        _ip4(g, r, 6, _tcp(40000, 443, 0x18) + b"\x16\x03\x01", df=True),  # data, rewritten
        _ip4(g, r, 6, _tcp(40000, 443, 0x14), df=True),                 # RST
        _ip4(g, "192.0.2.53", 6, _tcp(40002, 53, 0x02), df=True),       # DNS over TCP
        _ip4(gw, g, 6, _tcp(5353, 40002, 0x12), df=True),               # the forwarder's answer
        _ip4(g, gw, 6, _tcp(40003, 40001, 0x02), df=True),              # straight to a pool port
        _ip4(g, gw, 17, struct.pack("!HHHH", 5000, 9999, 12, 0) + b"ping", df=True),
        _ip4(g, r, 17, struct.pack("!HHHH", 5000, 443, 12, 0) + b"quic", df=True),
        _ip4(g, r, 6, _tcp(40004, 443, 0x02), df=False, frag=0x2000),   # a TCP first fragment
        _ip4(g, r, 6, _tcp(40005, 443, 0x10), df=True),                 # no flow: stray
        _ip6(g6, r6, 6, _tcp(40006, 8443, 0x02)),                       # IPv6 TLS SYN
        _ip6(gw6, g6, 6, _tcp(40002, 40006, 0x12)),                     # its reply
        _ip6(g6, r6, 0, b"\x06\x00" + bytes(6) + _tcp(40007, 443, 0x02)),  # hop-by-hop + SYN
    ]


def _with_seeds(args: list[str]) -> list[str]:
    """Write the too-big and fragment seeds into the output corpus (the first directory argument: a
    scratch or caller-given directory, never the checked-in corpus)."""
    dirs = [a for a in args[1:] if not a.startswith("-")]
    corpus_root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
    if dirs and os.path.isdir(dirs[0]) and \
            not os.path.abspath(dirs[0]).startswith(corpus_root + os.sep):
        for name, seeds in (("too-big", too_big_seeds()), ("fragment", fragment_seeds()),
                            ("steer", steer_seeds())):
            for i, seed in enumerate(seeds):
                with open(os.path.join(dirs[0], f"{name}-{i}"), "wb") as f:
                    f.write(seed)
    return args


def _drain() -> None:
    while lib.ns_gw_next_event(GW, EV, OUT, 2048):
        pass
    while lib.ns_gw_next_event(GW2, EV, OUT, 2048):
        pass
    while lib.ns_gw_next_event(GW3, EV, OUT, 2048):
        pass
    for s in (VMM, NS_END, VMM2, NS_END2, VMM3, NS_END3):
        timeout = s.gettimeout()
        s.setblocking(False)
        try:
            while s.recv(1 << 20):
                pass
        except (BlockingIOError, OSError):
            pass
        s.settimeout(timeout)


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
        framed = struct.pack("!I", len(data)) + data
        for end in (VMM3, NS_END3):  # the steering loop, from the guest and from "passt"
            try:
                if len(data) >= 14:  # shorter is a broken stream: the loop would hang up
                    end.sendall(framed)
            except OSError:
                pass
        if len(data) >= 2:  # a listener claiming whatever waits on a port
            lib.ns_gw_steer_claim(GW3, 40001 + data[0] % 4 if data[1] & 1 else 5353,
                                  CLAIM_DST, CLAIM_PORT)
    COUNT[0] += 1
    if COUNT[0] % 32 == 0:
        _drain()


def main() -> None:
    atheris.Setup(_with_seeds(fuzz_args(sys.argv, "frame")), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
