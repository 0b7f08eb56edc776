"""The blocking twin's own paths through the host-mode agent: the raw frame tier, chunked
fs, process control and teardown (its signatures: tests/microvm/test_sync_twins.py)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest

from microvm.agent import AgentError, Frame, SyncAgentClient
from microvm.agent.protocol import TERMINAL
from tests.microvm.agent.conftest import reap, spawn


def test_raw_frame_tier(sync_client: SyncAgentClient) -> None:
    rid = sync_client.allocate_id()
    try:
        sync_client.send_frame(Frame(rid, TERMINAL, "core.ping", {}))
        assert sync_client.recv_frame(rid, timeout=10).type == "core.pong"
    finally:
        sync_client.release_id(rid)
    with pytest.raises(AgentError, match="not allocated"):
        sync_client.recv_frame(rid, timeout=1)
    sync_client.pause_reading()
    sync_client.resume_reading()
    assert sync_client.ping() >= 0


def test_chunked_fs(sync_client: SyncAgentClient, tmp_path: Path) -> None:
    path = str(tmp_path / "chunks.bin")
    chunks = [bytes([i]) * 200_000 for i in range(6)]
    assert sync_client.write_file_chunks(path, iter(chunks), mode=0o600, mkdirs=True) == 1_200_000
    assert b"".join(sync_client.read_file_chunks(path)) == b"".join(chunks)
    assert b"".join(sync_client.read_file_chunks(path, offset=200_000, length=10)) == b"\x01" * 10
    # an abandoned read frees its request id: the client goes on working
    it = sync_client.read_file_chunks(path)
    assert next(it)
    it.close()
    assert sync_client.read_file(path)[:1] == b"\x00"


def test_process_control(sync_client: SyncAgentClient) -> None:
    p = sync_client.exec_stream("sleep", ["30"])
    assert p.start() is p and p.pid > 0 and p.result is None
    p.kill()
    ev = p.next_event(timeout=10)
    while ev is not None and ev.kind != "exited":
        ev = p.next_event(timeout=10)
    assert ev is not None and ev.signal == signal.SIGKILL
    assert p.next_event(timeout=1) is None
    r = p.wait()
    assert r.signal == signal.SIGKILL and p.result is r


def test_close_is_idempotent_and_stops_the_thread(agent_bin: Path) -> None:
    proc, sock = spawn(agent_bin)
    c = SyncAgentClient.from_socket(sock)
    c.hello()
    thread = c.portal.thread
    assert thread.is_alive() and thread is not threading.current_thread()
    c.close()
    c.close()
    assert c.closed and c.portal.closed and not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        c.ping()
    assert reap(proc) >= 0


def test_bad_timeout_fails_before_a_thread_starts() -> None:
    before = threading.active_count()
    with pytest.raises(ValueError, match="timeout must be > 0"):
        SyncAgentClient.connect_unix("/nonexistent/agent.sock", timeout=0)
    assert threading.active_count() == before
