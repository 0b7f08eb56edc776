"""Fuzz the HOST's agent frame decoder (``microvm.agent.protocol``) as a hostile guest would.

Any byte stream -> frames whose bodies hold only what the guest agent's encoder emits
(ints, bytes, text, lists, dicts with scalar keys, bools, None, floats; finite depth,
no shared references), or a :class:`ProtocolError`. Never another exception, never a
self-containing value, and the same frames however the stream is split. The payload
accessors the client uses (``payload_map``, ``field_*``, ``FileStat.from_payload``,
``error_from_payload``) also raise only ``ProtocolError``.

(``fuzz_agent_frame.py`` fuzzes the guest's C reader; this is the other direction.)

Run: ``python tests/fuzz/fuzz_agent_frames.py -max_total_time=60 [corpus_dir]``;
``--write-seeds DIR`` writes the hostile-guest seed corpus (valid frames of every
guest message type, tagged values, deep nesting, huge lengths) and exits.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["microvm.agent.protocol"]):
    from microvm.agent import protocol
    from microvm.agent.protocol import (
        FileStat,
        FrameDecoder,
        ProtocolError,
        error_from_payload,
        field_bytes,
        field_int,
        field_str,
        payload_map,
    )


def _frame(id_: int, flags: int, body: bytes) -> bytes:
    return struct.pack(">IIB", len(body) + 5, id_, flags) + body


def seeds() -> list[bytes]:
    """The hostile-guest seed corpus: one valid frame per guest message type, then the
    encodings a guest could use against the host."""
    import cbor2

    def f(t: str, p: object, id_: int = 1, flags: int = 0) -> bytes:
        return _frame(id_, flags, cbor2.dumps({"v": 1, "t": t, "p": p}))

    env = b"\xa3\x61v\x01\x61t\x69core.pong\x61p"  # the envelope up to the payload
    stat = {"name": "x", "type": "file", "size": 3, "mode": 0o644, "uid": 0, "gid": 0,
            "mtime_ns": 1}
    valid = [
        f("core.ready", {"version": 1, "generation": 1, "pid": 1, "boot_ms": 12,
                         "agent": "microvm-agent 1", "host_mode": False}),
        f("core.pong", {}, 2, 1),
        f("core.bootstrap.ack", {"skipped": ["hostname", "network"]}, 3, 1),
        f("core.exec.started", {"pid": 42}, 4),
        f("core.exec.stdout", {"data": b"hello\n"}, 4),
        f("core.exec.stderr", {"data": b"\xff\xfe"}, 4),
        f("core.exec.stdin.ack", {"bytes": 4096}, 4),
        f("core.exec.stdin.error", {"message": "backlog over 16 MiB"}, 4),
        f("core.exec.exited", {"code": -1, "signal": 9, "timed_out": True}, 4, 1),
        f("core.exec.failed", {"kind": "not_found", "errno": 2, "errno_name": "ENOENT",
                               "stage": "exec", "message": "no such file"}, 5, 1),
        f("core.fs.data", {"data": b"\x00" * 100}, 6),
        f("core.fs.response", {"ok": True, "size": 100}, 6, 1),
        f("core.fs.response", {"ok": True, "entries": [stat, {**stat, "name": b"\xff",
                                                              "type": "symlink",
                                                              "target": b"/\xfe"}]}, 7, 1),
        f("core.fs.response", {"ok": False, "errno": 13, "errno_name": "EACCES",
                               "message": "denied"}, 8, 1),
        f("core.metrics.response", {"uptime_ms": 5, "load": [0.5, 0.25, 1e300],
                                    "cpu": {"user": 1}, "memory": {"total": 2**63},
                                    "disk": {}, "net": {"eth0": {"rx": 1}}}, 9, 1),
        f("core.shutdown.ack", {"exit_code": 0}, 10, 5),
        f("core.error", {"kind": "malformed", "message": "bad"}, 0, 1),
    ]
    hostile = [
        _frame(1, 0, bytes.fromhex("d81c81d81d00")),  # shared value: a list holding itself
        _frame(1, 0, env + b"\xd8\x1c\x82\x01\xd8\x1d\x00"),
        _frame(1, 0, env + b"\xc1\x1a\x00\x00\x00\x00"),  # epoch datetime tag
        _frame(1, 0, env + b"\xc2\x49" + b"\x01" * 9),  # bignum
        _frame(1, 0, env + b"\xd9\x01\x02\x82\x01\x02"),  # set tag 258
        _frame(1, 0, env + b"\x9f\x01\x02\xff"),  # indefinite array
        _frame(1, 0, env + b"\xbf\x61a\x01\xff"),  # indefinite map
        _frame(1, 0, env + b"\x5f\x41a\xff"),  # indefinite bytes
        _frame(1, 0, env + b"\xf7"),  # undefined
        _frame(1, 0, env + b"\xf9\x7e\x00"),  # half-float NaN
        _frame(1, 0, env + b"\x81" * 31 + b"\x00"),  # at the depth limit
        _frame(1, 0, env + b"\x81" * 2000 + b"\x00"),  # deep nesting
        _frame(1, 0, env + b"\xa1" * 500 + b"\x00"),  # deep maps
        _frame(1, 0, env + b"\x9b" + b"\xff" * 8),  # 2^64-1 items
        _frame(1, 0, env + b"\xbb" + b"\xff" * 8),  # 2^64-1 pairs
        _frame(1, 0, env + b"\x5b" + b"\xff" * 8 + b"x"),  # huge byte string
        _frame(1, 0, env + b"\x7a\xff\xff\xff\xff"),  # huge text string
        _frame(1, 0, env + b"\xa2\x61a\x01\x61a\x02"),  # duplicate keys
        _frame(1, 0, env + b"\xa1\x80\x00"),  # array as a key
        struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 16,  # huge frame length
        struct.pack(">I", 2) + b"\x00\x00",  # below the minimum
    ]
    return valid + hostile


_SCALARS = (int, bytes, str, bool, float, type(None))


def _check_value(v: Any, depth: int, seen: set[int]) -> None:
    if depth > protocol.MAX_DEPTH:
        raise AssertionError(f"value nested {depth} deep got through")
    if isinstance(v, _SCALARS):
        return
    if id(v) in seen:
        raise AssertionError("a decoded value contains itself (shared reference)")
    if isinstance(v, list):
        seen.add(id(v))
        for x in v:
            _check_value(x, depth + 1, seen)
        seen.discard(id(v))
        return
    if isinstance(v, dict):
        seen.add(id(v))
        for k, x in v.items():
            if not isinstance(k, _SCALARS):
                raise AssertionError(f"map key of type {type(k).__name__}")
            _check_value(x, depth + 1, seen)
        seen.discard(id(v))
        return
    raise AssertionError(f"decoder produced a {type(v).__name__}")


def _use(frames: list[protocol.Frame]) -> None:
    """What the client does with a guest frame: everything may fail only with ProtocolError."""
    for fr in frames:
        _check_value(fr.payload, 1, set())
        try:
            p = payload_map(fr)
            for key in ("pid", "code", "bytes", "size"):
                field_int(p, key)
            field_str(p, "kind")
            if "data" in p:
                field_bytes(p, "data")
            entries = p.get("entries")
            if isinstance(entries, list):
                for e in entries:
                    if isinstance(e, dict):
                        FileStat.from_payload("x", e)
            FileStat.from_payload("x", p)
        except ProtocolError:
            pass
        error_from_payload("fuzz", fr.payload)


def _decode(chunks: list[bytes]) -> tuple[list[protocol.Frame], str | None]:
    dec = FrameDecoder()
    out: list[protocol.Frame] = []
    for c in chunks:
        try:
            out += dec.feed(c)
        except ProtocolError as e:
            return out, str(e)
    return out, None


def TestOneInput(data: bytes) -> None:
    frames, err = _decode([data])
    _use(frames)
    if len(data) > 1:  # the same frames (and the same verdict) however the bytes arrive
        cut = data[0] % len(data) or 1
        again, err2 = _decode([data[:cut], data[cut:]])
        if (err is None) != (err2 is None) or (err is None and len(again) != len(frames)):
            raise AssertionError(f"split at {cut} changed the result: {err!r} vs {err2!r}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        d = Path(sys.argv[2])
        d.mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(seeds()):
            (d / f"seed{i:02d}").write_bytes(s)
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
