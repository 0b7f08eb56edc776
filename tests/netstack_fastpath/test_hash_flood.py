"""Hostile guests vs the C hash tables: collision sets built against the old fixed hashes.

Until the tables were keyed, the flow table hashed a frame's 5-tuple with a fixed
multiply-xorshift function and the pin cache hashed names and addresses with FNV-1a:
anyone could compute, offline, keys that all land in one bucket.  These tests rebuild
those functions in Python (numpy, vectorised), search for such key sets, feed them
through the real C tables and check the probe / chain lengths stay bounded - they did
not before the tables were keyed per context with SipHash-1-3 under a random secret
(the flow-table insert walked one slot more per colliding flow: 400 flows, 400 probes).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np

from netstack import Classifier, NetworkPolicy, PinCache, Rule, build_frame

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "netstack" / "csrc"
M64 = (1 << 64) - 1
GUEST = "10.0.2.15"
SERVER = "203.0.113.7"

#: Far above what a random hash gives at these loads (a handful), far below the
#: length of the crafted chains (hundreds).
BOUND = 24


def _v4mapped(ip: str) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + bytes(int(x) for x in ip.split("."))


def _old_flow_hash_tail(w: list[int]) -> int:
    """The old ``key_hash`` of classify.c over key words w0..w3 (Python ints)."""
    h = (w[0] * 0x9E3779B97F4A7C15) & M64
    h ^= (w[1] + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2)) & M64
    h ^= (w[2] * 0xC2B2AE3D27D4EB4F + ((h << 6) & M64) + (h >> 2)) & M64
    h ^= (w[3] * 0x165667B19E3779F9 + ((h << 6) & M64) + (h >> 2)) & M64
    return h


def _old_flow_hash(h3: int, w4: np.ndarray) -> np.ndarray:
    """The last word and the finaliser of the old ``key_hash``, vectorised over w4."""
    h = np.full(w4.shape, h3, dtype=np.uint64)
    h ^= w4 * np.uint64(0x27D4EB2F165667C5) + (h << np.uint64(6)) + (h >> np.uint64(2))
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return h & np.uint64(0xFFFFFFFF)


def flow_collisions(mask: int, count: int) -> list[tuple[int, int]]:
    """(sport, dport) pairs whose egress TCP flows GUEST -> SERVER shared one bucket
    of a flow table of ``mask + 1`` slots under the old hash."""
    key = _v4mapped(GUEST) + _v4mapped(SERVER)
    h3 = _old_flow_hash_tail(list(struct.unpack("<4Q", key)))
    dports = np.array([80, 443, 8080, 8443, 22, 25, 993, 5432, 21, 23, 110, 143, 465, 587,
                       3306, 6379], dtype=np.uint64)
    sport = np.repeat(np.arange(1024, 65536, dtype=np.uint64), len(dports))
    dport = np.tile(dports, 65536 - 1024)
    # flow_key bytes 32..39: sport, dport (u16 host order), proto 6, dir 1 (egress), 0, 0
    w4 = sport | (dport << np.uint64(16)) | (np.uint64(6) << np.uint64(32)) \
        | (np.uint64(1) << np.uint64(40))
    buckets = _old_flow_hash(h3, w4) & np.uint64(mask)
    target = np.bincount(buckets.astype(np.int64)).argmax()
    hit = np.nonzero(buckets == target)[0][:count]
    assert len(hit) == count, "not enough collisions found"
    return [(int(sport[i]), int(dport[i])) for i in hit]


def _old_fnv(rows: np.ndarray, seed: int) -> np.ndarray:
    """The old pin-cache ``hash_bytes`` (FNV-1a, 32 bits) over each row of bytes."""
    h = np.full(rows.shape[0], (2166136261 ^ seed) & 0xFFFFFFFF, dtype=np.uint32)
    for col in range(rows.shape[1]):
        h ^= rows[:, col].astype(np.uint32)
        h *= np.uint32(16777619)
    return h ^ (h >> np.uint32(15))


def name_collisions(mask: int, count: int) -> list[str]:
    """Hostnames that shared one bucket of the old pin cache's name table (IPv4 key)."""
    n = 1 << 20
    names = [f"h{i:06x}.flood.test" for i in range(n)]
    rows = np.frombuffer("".join(names).encode(), dtype=np.uint8).reshape(n, -1)
    buckets = _old_fnv(rows, 4) & np.uint32(mask)
    target = np.bincount(buckets.astype(np.int64)).argmax()
    hit = np.nonzero(buckets == target)[0][:count]
    assert len(hit) == count
    return [names[i] for i in hit]


def ip_collisions(mask: int, count: int) -> list[str]:
    """IPv6 addresses (2001:db8::/96 + 32 bits) that shared one bucket of the old
    pin cache's address table."""
    low = np.arange(1 << 20, dtype=np.uint32)
    rows = np.zeros((len(low), 16), dtype=np.uint8)
    rows[:, 0:4] = (0x20, 0x01, 0x0D, 0xB8)
    for k in range(4):
        rows[:, 12 + k] = (low >> np.uint32(8 * (3 - k))) & np.uint32(0xFF)
    buckets = _old_fnv(rows, 0x9E37) & np.uint32(mask)
    target = np.bincount(buckets.astype(np.int64)).argmax()
    hit = np.nonzero(buckets == target)[0][:count]
    assert len(hit) == count
    return [f"2001:db8::{int(low[i]) >> 16:x}:{int(low[i]) & 0xFFFF:x}" for i in hit]


def test_flow_table_collision_set_keeps_probes_short() -> None:
    # max_flows 1024 -> 2048 slots (mask 2047); 400 crafted flows stay below eviction
    pairs = flow_collisions(2047, 400)
    policy = NetworkPolicy.custom(default_egress="allow")
    with Classifier(policy, gateway="10.0.2.2", max_flows=1024) as c:
        frames = [build_frame(GUEST, SERVER, "tcp", sp, dp, flags=0x02) for sp, dp in pairs]
        assert c.classify(frames, now=1.0) == bytes(len(frames))
        # every crafted flow is a separate, found-again entry
        assert c.stats().live_flows == 400
        assert c.classify(frames, now=2.0) == bytes(len(frames))
        assert c.stats().flows_created == 400
        assert c.stats().max_probe <= BOUND, c.stats()


def test_flow_tables_are_keyed_per_classifier() -> None:
    # the same flows land in different slots of two classifiers: insertion order
    # differs in one of them and the flow table is still consistent
    pairs = flow_collisions(2047, 64)
    frames = [build_frame(GUEST, SERVER, "tcp", sp, dp, flags=0x02) for sp, dp in pairs]
    policy = NetworkPolicy.custom(rules=[Rule.allow(destination="public")])
    for _ in range(2):
        with Classifier(policy, max_flows=1024) as c:
            c.classify(frames, now=1.0)
            c.classify(frames[::-1], now=2.0)
            assert c.stats().flows_created == 64 and c.stats().max_probe <= BOUND


def test_flows_are_found_again_in_every_address_form() -> None:
    # the per-frame hash (from the parsed fields) and the key hash (flow_info,
    # replies, fragments) must agree: IPv4, IPv6, and IPv6 carrying v4-mapped
    # addresses (the same key as IPv4), both directions, every protocol
    def mapped_v6(proto: str) -> bytes:
        # an IPv6 frame whose addresses are v4-mapped (build_frame would make it IPv4)
        f = bytearray(build_frame("2001:db8::15", "2001:db8:1::7", proto, 40000, 8080))
        f[22:38], f[38:54] = _v4mapped("10.0.2.16"), _v4mapped("203.0.113.8")
        return bytes(f)

    frames = [build_frame(GUEST, SERVER, p, 40000, 8080) for p in ("tcp", "udp", "icmpv4")]
    frames += [build_frame("2001:db8::15", "2001:db8:1::7", p, 40000, 8080)
               for p in ("tcp", "udp", "icmpv6")]
    frames += [mapped_v6(p) for p in ("tcp", "udp", "icmpv6")]
    with Classifier(NetworkPolicy.custom(default_egress="allow"), max_flows=64) as c:
        for i, f in enumerate(frames):
            for direction in ("egress", "ingress"):
                c.classify([f], direction=direction, now=1.0)
                info = c.flow_info(f, direction=direction)
                assert info is not None and info.packets == 1, (i, direction)
        assert c.stats().flows_created == 2 * len(frames)
        assert c.stats().max_probe <= BOUND


def test_pin_cache_name_collision_set_keeps_chains_short() -> None:
    names = name_collisions(1023, 300)
    pins = PinCache(max_bindings=1024, ttl_ceiling=3600)   # 1024 buckets
    for i, name in enumerate(names):
        assert pins.pin(name, [f"192.0.2.{i % 250 + 1}"], ttl=60, now=0.0) == 1
    assert len(pins) == 300
    assert pins.names("192.0.2.1", now=1.0) >= {names[0]}
    assert pins.max_chain <= BOUND, pins.max_chain


def test_pin_cache_address_collision_set_keeps_chains_short() -> None:
    ips = ip_collisions(1023, 300)
    pins = PinCache(max_bindings=1024, ttl_ceiling=3600)
    for k in range(5):   # at most 64 addresses per name
        assert pins.pin(f"n{k}.flood.test", ips[60 * k:60 * (k + 1)], ttl=60, now=0.0) == 60
    assert len(pins) == 300
    assert pins.names(ips[-1], now=1.0) == {"n4.flood.test"}
    assert pins.max_chain <= BOUND, pins.max_chain


def test_siphash_known_answers(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("clang")
    assert cc is not None, "needs a C compiler (build-essential)"
    exe = tmp_path / "kat"
    subprocess.run([cc, "-std=c11", "-O1", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=undefined", "-Wall", "-Wextra", "-Werror",
                    "-I", str(CSRC), str(HERE / "siphash_kat.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bad=0" in out.stdout, out.stdout + out.stderr
