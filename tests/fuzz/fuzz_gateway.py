#!/usr/bin/env python3
"""atheris target: the C gateway loop's frame handling.

    python3 tests/fuzz/fuzz_gateway.py -max_total_time=60

Each input is (1) answered with ``ns_gw_build_reject`` (the RST / ICMP unreachable
builder), (2) looked up as an uplink frame (``ns_ctx_reply_lookup``, including the
ICMP-error quote parser) and as a guest frame answering an ingress flow, and (3) sent
as one frame to a running gateway loop from both sides (guest stream socket and the
uplink), whose policy has domain rules (so frames are held and released) and a
published port. Runs against the ASan+UBSan build (see _netstack_asan.py): a memory
error in the loop thread aborts the run.
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
GW = lib.ns_gw_new(LOOP_CLS.handle, CFG)
assert GW != ffi.NULL and lib.ns_gw_start(GW) == 0
OUT = ffi.new("uint8_t[]", 2048)
EV = ffi.new("ns_gw_event *")
COUNT = [0]


def _drain() -> None:
    while lib.ns_gw_next_event(GW, EV, OUT, 2048):
        pass
    for s in (VMM, NS_END):
        try:
            while s.recv(1 << 20):
                pass
        except (BlockingIOError, OSError):
            pass


def TestOneInput(data: bytes) -> None:
    n = lib.ns_gw_build_reject(data, len(data), OUT, 2048)
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
    COUNT[0] += 1
    if COUNT[0] % 32 == 0:
        _drain()


def main() -> None:
    atheris.Setup(fuzz_args(sys.argv, "frame"), TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
