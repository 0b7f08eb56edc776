"""Whole-path differential: frames through the classifier (flow table, pin cache, SNI
wait and ClientHello reassembly) end with the verdict of policy.evaluate."""

from __future__ import annotations

import random

from netstack import Classifier, Flow, PinCache, Verdict, build_frame

from ._gen import ADDRESSES, NAMES, random_policy
from ._tls import python_hello

GUEST = "10.0.2.15"
GUEST6 = "fd42:6d73:62::2"
GATEWAY = ["10.0.2.2", "fd42:6d73:62::1"]
ALLOWED = {Verdict.ALLOW, Verdict.TO_PROXY}


def test_frames_end_with_the_reference_verdict() -> None:
    rng = random.Random(99)
    hellos = {n: python_hello(n) for n in NAMES if "." in n}
    hellos["plain"] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    remotes = [a for a in ADDRESSES if a not in ("0.0.0.0", "::", "::ffff:10.0.0.1",
                                                  "::ffff:192.0.2.7")]
    checked = 0
    for _ in range(60):
        policy = random_policy(rng, 10)
        pins = PinCache()
        for ip in rng.sample(remotes, 8):
            pins.pin(rng.choice(NAMES[:-2]), [ip], ttl=1000, now=0.0)
        c = Classifier(policy, gateway=GATEWAY, pins=pins, max_flows=1024)
        for i in range(60):
            remote = rng.choice(remotes)
            v6 = ":" in remote
            guest = GUEST6 if v6 else GUEST
            proto = rng.choice(("tcp", "tcp", "udp", "icmpv4" if not v6 else "icmpv6"))
            direction = rng.choice(("egress", "egress", "ingress"))
            port = rng.choice((22, 80, 443, 8080, rng.randrange(1, 65536)))
            if port == 53:
                port = 54
            sport = 10000 + i
            src, dst = (guest, remote) if direction == "egress" else (remote, guest)
            names = pins.names(remote, now=1.0)
            sni = None
            if proto == "tcp":
                frames = [build_frame(src, dst, "tcp", sport, port, flags=0x02, seq=1)]
                if direction == "egress":
                    key = rng.choice(sorted(hellos))
                    payload = hellos[key]
                    sni = None if key == "plain" else key
                    cut = rng.randrange(1, len(payload))
                    frames.append(build_frame(src, dst, "tcp", sport, port, payload[:cut], seq=2))
                    frames.append(build_frame(src, dst, "tcp", sport, port, payload[cut:],
                                              seq=2 + cut))
            elif proto == "udp":
                frames = [build_frame(src, dst, "udp", sport, port, b"x")]
            else:
                frames = [build_frame(src, dst, proto)]
                port = None  # type: ignore[assignment]
            verdicts, rules = c.classify_with_rules(frames, direction=direction, now=1.0)
            final = Verdict(verdicts[-1])
            want = policy.evaluate(Flow(direction, proto, remote, port, sni=sni, names=names,
                                        gateway=GATEWAY))
            got_action = "allow" if final in ALLOWED else "deny"
            context = (policy, direction, proto, remote, port, sni, names, [Verdict(v) for v in verdicts])
            assert final != Verdict.NEED_MORE, context
            assert (got_action, None if rules[-1] < 0 else rules[-1]) == (
                want.action, want.rule_index), context
            if sni is None and proto == "tcp":
                # decided without an SNI: also what the reference says with sni=None
                assert want == policy.evaluate(Flow(direction, proto, remote, port, names=names,
                                                    gateway=GATEWAY))
            checked += 1
    assert checked == 3600
