"""Frame codec (Python) and the agent's handling of malformed, oversized and unknown frames."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microvm.agent import AgentClient, Frame, FrameDecoder, ProtocolError, encode_frame
from microvm.agent.protocol import MAX_FRAME, TERMINAL, encode_body, encode_raw
from tests.microvm.agent.conftest import host_agent

ROOT = Path(__file__).resolve().parents[3]


@given(
    id_=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255),
    type_=st.text(max_size=40),
    payload=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
        ),
        max_leaves=20,
    ),
    split=st.integers(1, 50),
)
def test_python_codec_round_trip(
    id_: int, flags: int, type_: str, payload: object, split: int
) -> None:
    frame = Frame(id_, flags, type_, payload)
    wire = encode_frame(frame) * 2
    dec = FrameDecoder()
    out = []
    for i in range(0, len(wire), split):
        out += dec.feed(wire[i : i + split])
    assert out == [frame, frame]
    assert dec.pending == 0


def test_python_codec_rejects() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_raw(1, 0, bytes(MAX_FRAME))
    with pytest.raises(ProtocolError, match="id"):
        encode_raw(2**32, 0, b"")
    with pytest.raises(ProtocolError, match="length 1"):
        FrameDecoder().feed(struct.pack(">I", 1) + b"x")
    with pytest.raises(ProtocolError, match="length"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="CBOR"):
        FrameDecoder().feed(encode_raw(1, 0, b"\xff\xff"))
    with pytest.raises(ProtocolError, match="map"):
        FrameDecoder().feed(encode_raw(1, 0, cbor2.dumps([1, 2])))


# What a hostile guest could send that the agent's encoder (csrc/cbor.c) never emits.
HOSTILE_BODIES = {
    "shared-value self reference": bytes.fromhex("d81c81d81d00"),
    "tag in payload": cbor2.dumps({"v": 1, "t": "core.pong", "p": {"x": 0}})[:-1] + b"\xc1\x00",
    "tagged envelope": b"\xd9\xd9\xf7" + cbor2.dumps({"v": 1, "t": "core.pong", "p": {}}),
    "bignum": cbor2.dumps({"v": 1, "t": "core.pong", "p": 2**70}),
    "indefinite array": b"\xa3\x61v\x01\x61t\x69core.pong\x61p\x9f\xff",
    "indefinite text": b"\xa3\x61v\x01\x61t\x7f\x69core.pong\xff\x61p\xa0",
    "lone break": b"\xff",
    "undefined": b"\xa3\x61v\x01\x61t\x69core.pong\x61p\xf7",
    "simple value": b"\xa3\x61v\x01\x61t\x69core.pong\x61p\xf8\x20",
    "half float": b"\xa3\x61v\x01\x61t\x69core.pong\x61p\xf9\x3c\x00",
    "single float": b"\xa3\x61v\x01\x61t\x69core.pong\x61p\xfa\x3f\x80\x00\x00",
    "reserved info": b"\x1c",
    "deep nesting": b"\xa3\x61v\x01\x61t\x69core.pong\x61p" + b"\x81" * 40 + b"\x00",
    "huge array": b"\xa3\x61v\x01\x61t\x69core.pong\x61p\x9b" + b"\xff" * 8,
    "huge map": b"\xa3\x61v\x01\x61t\x69core.pong\x61p\xbb" + b"\x7f" + b"\xff" * 7,
    "huge bytes": b"\xa3\x61v\x01\x61t\x69core.pong\x61p\x5b" + b"\xff" * 8,
    "bad utf-8": b"\xa3\x61v\x01\x61t\x62\xc3\x28\x61p\xa0",
    "duplicate key": b"\xa4\x61v\x01\x61t\x69core.pong\x61p\xa0\x61v\x02",
    "array key": b"\xa4\x61v\x01\x61t\x69core.pong\x61p\xa0\x80\x00",
    "trailing byte": cbor2.dumps({"v": 1, "t": "core.pong", "p": {}}) + b"\x00",
    "truncated": cbor2.dumps({"v": 1, "t": "core.pong", "p": {"data": b"abc"}})[:-2],
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_host_decoder_rejects_what_the_agent_never_sends(name: str) -> None:
    body = HOSTILE_BODIES[name]
    with pytest.raises(ProtocolError, match="frame 7: body is not valid agent CBOR"):
        FrameDecoder().feed(encode_raw(7, 0, body))


def test_host_decoder_accepts_the_agents_encodings() -> None:
    # float64 (metrics), non-minimal 4-byte counts (cbor_put_map_open), 64-bit ints, bytes
    body = (b"\xba\x00\x00\x00\x03\x61v\x01\x61t\x75core.metrics.response\x61p"
            b"\xa4\x64load\x9a\x00\x00\x00\x01\xfb\x3f\xf8\x00\x00\x00\x00\x00\x00"
            b"\x61n\x3b\x7f\xff\xff\xff\xff\xff\xff\xff\x61b\x43\x00\xff\x01"
            b"\x61m\x1b\xff\xff\xff\xff\xff\xff\xff\xff")
    (f,) = FrameDecoder().feed(encode_raw(3, TERMINAL, body))
    assert f.type == "core.metrics.response"
    assert f.payload == {"load": [1.5], "n": -(2**63), "b": b"\x00\xff\x01", "m": 2**64 - 1}
    deep: object = 0
    for _ in range(31):  # the envelope map is level 1: 31 more levels reach the limit of 32
        deep = [deep]
    (f,) = FrameDecoder().feed(encode_raw(1, 0, cbor2.dumps({"v": 1, "t": "x", "p": deep})))
    assert f.payload == deep


@pytest.mark.fuzz
def test_short_host_decoder_fuzz_run(tmp_path: Path) -> None:
    """A few seconds of tests/fuzz/fuzz_agent_frames.py over its hostile-guest seeds."""
    pytest.importorskip("atheris")
    target = ROOT / "tests" / "fuzz" / "fuzz_agent_frames.py"
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(target), "--write-seeds", str(corpus)], check=True,
                   timeout=60, cwd=tmp_path)
    assert len(list(corpus.iterdir())) > 30
    proc = subprocess.run(
        [sys.executable, str(target), "-max_total_time=4", "-rss_limit_mb=1024",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr


def test_fuzz_seeds_decode_or_fail_typed() -> None:
    sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
    try:
        import fuzz_agent_frames  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    ok = 0
    for s in fuzz_agent_frames.seeds():
        try:
            ok += len(FrameDecoder().feed(s))
        except ProtocolError:
            pass
    assert ok >= 17  # every valid guest message type decodes


async def _expect(client: AgentClient, raw: bytes, rid: int) -> Frame:
    """Send raw bytes, return the agent's answer routed to ``rid``."""
    if rid not in client._routes:
        client._routes[rid] = asyncio.Queue()
    try:
        await client.send_bytes(raw)
        return await client.recv_frame(rid, timeout=10)
    finally:
        client.release_id(rid)


def test_agent_answers_bad_frames_with_errors(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (c, proc):
            # Body that is not CBOR.
            f = await _expect(c, encode_raw(9001, 0, b"\xff\x00garbage"), 9001)
            assert (f.type, f.payload["kind"]) == ("core.error", "malformed")
            # CBOR but not a map / missing fields / wrong types.
            for body in (
                cbor2.dumps([1]),
                cbor2.dumps({"v": 1}),
                cbor2.dumps({"v": "x", "t": "core.ping"}),
                cbor2.dumps({"v": 1, "t": 5}),
                b"\xa1\x61v",  # truncated map
                b"\x9f\xff",  # indefinite array
                b"\xc1\x00",  # tag
                cbor2.dumps({"v": 1, "t": "core.ping", "p": 1.5}),  # float
                cbor2.dumps({"v": 1, "t": "core.ping"}) + b"\x00",
            ):  # trailing byte
                f = await _expect(c, encode_raw(9002, 0, body), 9002)
                assert f.type == "core.error" and f.payload["kind"] == "malformed", (body, f)
            # Nesting bomb.
            f = await _expect(c, encode_raw(9003, 0, b"\x81" * 1000 + b"\x00"), 9003)
            assert f.payload["kind"] == "malformed" and "deep" in f.payload["message"]
            # Unknown type, wrong version.
            f = await _expect(c, encode_raw(9004, 0, encode_body("core.nope", {})), 9004)
            assert f.payload["kind"] == "unknown_type" and "core.nope" in f.payload["message"]
            f = await _expect(c, encode_raw(9005, 0, encode_body("core.ping", {}, version=0)), 9005)
            assert f.payload["kind"] == "version"
            # Length below the minimum: error on id 0, then the stream continues.
            f = await _expect(c, struct.pack(">I", 2) + b"\x00\x00", 0)
            assert f.payload["kind"] == "malformed"
            # Oversized: error naming the length, the body is skipped, the stream continues.
            big = MAX_FRAME + 100
            head = struct.pack(">IIB", big, 9006, 0)
            f = await _expect(c, head + bytes(big - 5), 9006)
            assert f.payload["kind"] == "oversized" and str(big) in f.payload["message"]
            # Bad payloads for known types.
            f = await _expect(
                c,
                encode_raw(9007, 0, encode_body("core.fs.request", {"op": "explode", "path": "/"})),
                9007,
            )
            assert f.payload["kind"] == "bad_request" and "explode" in f.payload["message"]
            f = await _expect(
                c, encode_raw(9008, 0, encode_body("core.shutdown", {"exit_code": 999})), 9008
            )
            assert f.payload["kind"] == "bad_request"
            # Still healthy.
            assert await c.ping() >= 0
            assert proc.poll() is None

    asyncio.run(main())


def test_raw_frame_tier(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (c, _):
            rid = c.allocate_id()
            await c.send_frame(Frame(rid, TERMINAL, "core.ping", {}))
            f = await c.recv_frame(rid, timeout=5)
            assert (f.id, f.type, f.terminal) == (rid, "core.pong", True)
            c.release_id(rid)

    asyncio.run(main())


@settings(max_examples=40, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=2000))
def test_random_bytes_never_crash_the_agent(agent_bin: Path, garbage: bytes) -> None:
    host, guest = socket.socketpair()
    proc = subprocess.Popen(
        [str(agent_bin), "--channel-fd", str(guest.fileno())], pass_fds=[guest.fileno()]
    )
    guest.close()
    try:
        host.sendall(garbage)
        host.shutdown(socket.SHUT_WR)
        host.settimeout(10)
        while host.recv(65536):
            pass
        rc = proc.wait(10)
        assert rc == 0, f"agent exited {rc} on input {garbage!r}"
    finally:
        host.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_channel_path_mode_reconnect_and_connect_retry(agent_bin: Path, tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"

    async def main() -> None:
        # The client starts first and retries until the agent listens.
        connect = asyncio.ensure_future(AgentClient.connect_unix(sock, timeout=10))
        await asyncio.sleep(0.2)
        proc = subprocess.Popen([str(agent_bin), "--channel-path", str(sock)])
        try:
            c = await connect
            await c.hello()
            bg = await c.exec_stream("sleep", ["30"])
            # Garbage, then drop the connection mid-frame.
            await c.send_bytes(struct.pack(">I", 1000) + os.urandom(10))
            await c.close()
            # Reconnect: fresh framing state, the old process kept running (default policy).
            c2 = await AgentClient.connect_unix(sock, timeout=10)
            await c2.hello()
            assert (await c2.exec("echo", ["again"])).stdout == b"again\n"
            assert os.path.exists(f"/proc/{bg.pid}")
            await c2.shutdown(3)
            await c2.close()
            assert proc.wait(10) == 3
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    asyncio.run(main())


def test_ping_metrics_shutdown(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (c, proc):
            assert c.ready is not None and c.ready.generation == 1 and c.ready.host_mode
            m = await c.metrics()
            assert m["memory"]["total"] > 0 and m["cpu"]["ncpu"] >= 1
            assert "lo" in m["net"] and m["disk"]["total"] > 0
            assert len(m["load"]) == 3
            assert await c.shutdown(exit_code=5) == 5
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.01)
            assert proc.returncode == 5

    asyncio.run(main())


def test_hello_rejects_bad_version(agent_bin: Path) -> None:
    from microvm.agent import AgentError

    async def main() -> None:
        async with host_agent(agent_bin) as (c, _):
            with pytest.raises(AgentError) as e:
                await c.hello(version=0)
            assert e.value.kind == "version"

    asyncio.run(main())


def test_second_hello_starts_a_new_host_session(agent_bin: Path) -> None:
    async def main() -> None:
        async with host_agent(agent_bin) as (c, _):
            old = await c.exec_stream("sleep", ["30"])
            await c.hello()  # e.g. a reconnect the guest could not observe
            await old.signal(9)  # the old session is detached: its id no longer reaches it
            await asyncio.sleep(0.2)
            assert os.path.exists(f"/proc/{old.pid}")
            os.kill(old.pid, 9)
            assert (await c.exec("echo", ["fresh"])).stdout == b"fresh\n"

    asyncio.run(main())


def test_kill_on_disconnect_policy(agent_bin: Path, tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"

    async def main() -> None:
        proc = subprocess.Popen([str(agent_bin), "--channel-path", str(sock)])
        try:
            c = await AgentClient.connect_unix(sock, timeout=10)
            await c.hello()
            await c.bootstrap({"kill_on_disconnect": True})
            bg = await c.exec_stream("sleep", ["30"])
            await c.close()
            deadline = time.monotonic() + 5
            while os.path.exists(f"/proc/{bg.pid}") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not os.path.exists(f"/proc/{bg.pid}"), "process survived the disconnect"
        finally:
            proc.kill()
            proc.wait()

    asyncio.run(main())


def test_sync_client_streaming(agent_bin: Path) -> None:
    from microvm.agent import SyncAgentClient

    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(agent_bin), "--channel-fd", str(guest.fileno())], pass_fds=[guest.fileno()])
    guest.close()
    with SyncAgentClient.from_socket(host) as c:
        c.hello()
        p = c.exec_stream("sh", ["-c", "read x; echo got:$x; echo err >&2; exit 2"])
        assert p.pid > 0
        p.write_stdin(b"abc\n")
        kinds, out = [], b""
        for ev in p.events(timeout=10):
            kinds.append(ev.kind)
            out += ev.data if ev.kind == "stdout" else b""
        assert kinds[-1] == "exited" and "stderr" in kinds and out == b"got:abc\n"
        p2 = c.exec_stream("cat")
        p2.write_stdin(b"zz")
        p2.close_stdin()
        assert p2.wait(10).stdout == b"zz"
        assert c.ping() >= 0
    assert proc.wait(5) == 0
