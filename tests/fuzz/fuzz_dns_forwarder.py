"""atheris target: netstack.gateway._dns_forwarder on arbitrary guest messages and upstream answers.

Run: ``python tests/fuzz/fuzz_dns_forwarder.py -max_total_time=60``. The forwarder must
never raise on guest input; any reply echoes the transaction id with QR set and fits the
transport (UDP: the client's EDNS size, at least 512; TCP: 65535). Upstream answers fed
to the rebind check and the pin-cache report must never raise either. No network I/O:
the policy allows only the host alias (answered locally), everything else is NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import struct
import sys

import atheris
import dns.message  # imported before instrumentation: only netstack is instrumented

with atheris.instrument_imports(include=["netstack.gateway"]):
    from netstack import NetworkPolicy, Rule
    from netstack.gateway import DnsForwarder

POLICY = NetworkPolicy.custom(rules=[Rule.allow("host.microvm.internal"),
                                     Rule.allow("10.0.0.0/8")])
PINS: list[object] = []
FWD = DnsForwarder(POLICY.evaluate_dns, ["192.0.2.1"], host_alias="host.microvm.internal",
                   gateway=["172.16.0.1", "fd42:6d73:62::1"],
                   on_answer=lambda n, ips: PINS.append((n, ips)))
LOOP = asyncio.new_event_loop()


def TestOneInput(data: bytes) -> None:
    proto = "tcp" if data[:1] == b"\x01" else "udp"
    wire = data[1:]
    reply = LOOP.run_until_complete(FWD.handle(wire, proto))
    if reply is not None:
        assert len(reply) >= 12
        assert reply[:2] == wire[:2]
        assert struct.unpack("!H", reply[2:4])[0] & 0x8000
        assert len(reply) <= 65535
    try:
        msg = dns.message.from_wire(wire)
    except Exception:
        return
    FWD._rebind_violation(msg)
    if msg.question:
        FWD._report("fuzz.test", msg.question[0].name, msg)
    PINS.clear()


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
