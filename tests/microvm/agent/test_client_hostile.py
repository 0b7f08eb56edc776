"""The host client treats the guest as untrusted: bad frames become typed errors, never crashes
or huge allocations."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable

import cbor2
import pytest

from microvm.agent import AgentClient, AgentError, Frame, FrameDecoder, ProtocolError, encode_frame
from microvm.agent.protocol import TERMINAL


def _fake_agent(sock: socket.socket, respond: Callable[[Frame], list[bytes]]) -> threading.Thread:
    """A scripted guest: for every frame from the host, send respond(frame)."""

    def run() -> None:
        dec = FrameDecoder()
        try:
            while data := sock.recv(65536):
                for f in dec.feed(data):
                    for out in respond(f):
                        sock.sendall(out)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _ready(f: Frame) -> bytes:
    return encode_frame(Frame(f.id, TERMINAL, "core.ready", {"version": 1, "generation": 1, "pid": 1, "boot_ms": 5}))


async def _client(respond: Callable[[Frame], list[bytes]]) -> AgentClient:
    host, guest = socket.socketpair()
    _fake_agent(guest, respond)
    return await AgentClient.from_socket(host)


def test_bad_payload_types_raise_protocol_error() -> None:
    def respond(f: Frame) -> list[bytes]:
        if f.type == "core.hello":
            return [encode_frame(Frame(f.id, TERMINAL, "core.ready", {"version": "one", "pid": 1}))]
        if f.type == "core.exec.request":
            return [
                encode_frame(Frame(f.id, 0, "core.exec.started", {"pid": 7})),
                encode_frame(Frame(f.id, 0, "core.exec.stdout", {"data": 2**40})),  # not bytes(2**40)!
            ]
        if f.type == "core.fs.request":
            return [encode_frame(Frame(f.id, TERMINAL, "core.fs.response", ["not", "a", "map"]))]
        return []

    async def main() -> None:
        c = await _client(respond)
        with pytest.raises(ProtocolError, match="version"):
            await c.hello()
        with pytest.raises(ProtocolError, match="data"):
            await c.exec("x", timeout=5)
        with pytest.raises(ProtocolError, match="payload"):
            await c.stat("/x")
        await c.close()

    asyncio.run(main())


def test_garbage_from_guest_fails_pending_requests() -> None:
    def respond(f: Frame) -> list[bytes]:
        if f.type == "core.hello":
            return [_ready(f)]
        return [struct.pack(">I", 0xFFFFFFFF) + b"junk"]

    async def main() -> None:
        c = await _client(respond)
        await c.hello()
        with pytest.raises(AgentError) as e:
            await c.ping()
        assert e.value.kind == "connection_lost" and "undecodable" in str(e.value)
        assert c.closed
        with pytest.raises(AgentError):
            await c.ping()
        await c.close()

    asyncio.run(main())


def test_unsolicited_frames_are_bounded() -> None:
    def respond(f: Frame) -> list[bytes]:
        spam = [encode_frame(Frame(424242 + i, 0, "core.exec.stdout", {"data": b"x"})) for i in range(500)]
        return [*spam, _ready(f)]

    async def main() -> None:
        c = await _client(respond)
        await c.hello()
        assert len(c.unrouted) <= 64
        await c.close()

    asyncio.run(main())


def test_decoder_many_small_frames_in_one_chunk() -> None:
    wire = b"".join(encode_frame(Frame(i, 0, "core.pong", {})) for i in range(20000))
    frames = FrameDecoder().feed(wire)
    assert [f.id for f in frames] == list(range(20000))
    assert cbor2.loads(wire[9 : 9 + struct.unpack(">I", wire[:4])[0] - 5])["t"] == "core.pong"
