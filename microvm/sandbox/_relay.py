"""Relay of the guest agent protocol: one upstream agent connection, many local clients.

A sandbox's supervisor owns the ONLY connection to the guest agent (an
:class:`~microvm.agent.AgentClient` after ``hello`` and ``bootstrap``).
:class:`AgentRelay` listens on a unix socket and speaks the same protocol to
any number of ordinary :class:`~microvm.agent.AgentClient` /
:class:`~microvm.agent.SyncAgentClient` instances, so they work through it
unchanged and concurrently.

How frames travel:

* ``core.hello`` is answered locally from the agent's :class:`ReadyInfo`
  (``generation = min(client version, agent version, upstream generation)``):
  a hello reaching the agent would start a new host session and detach every
  other client's processes.
* ``core.bootstrap`` and ``core.shutdown`` are refused with a TERMINAL
  ``core.error {kind: "bad_request"}``: they belong to the supervisor.
* Any other frame on a client id not yet seen opens a *stream*: the relay
  allocates an upstream id, forwards the frame with the id rewritten (the body
  bytes are forwarded as received, after being checked to decode) and pumps
  the agent's frames back under the client's id until the TERMINAL one; then
  both ids are free again. Each connection has its own id space, so two
  clients using the same ids never collide. Control frames (stdin, resize,
  signal, fs data) for an id with no open stream are dropped, as the agent
  drops them for a finished session.

When a client goes away (disconnect, garbage, too slow, relay closed) its
streams are *abandoned*: an exec session gets ``core.exec.signal {signal: 9}``
and is drained to its exit; a file it was still streaming into the guest is
ended (an empty TERMINAL ``core.fs.data``) and, when the agent reports the
partial file written, removed with an fs ``remove`` (appends are ended, not
removed: the bytes appended so far stay); any other request is drained to its
answer. An abandoned stream that does not end within 30 s is forgotten. The
same happens to a running exec whose id the agent ends with ``core.error``
(e.g. a bad ``core.exec.resize``): the client's id is over, so its process is
killed rather than left running unreachable.

When the agent connection is lost, every open stream of every client gets a
TERMINAL ``core.error {kind: "connection_lost"}`` and every client is
disconnected; new connections get the same error on id 0 and are closed.

Limits: at most ``max_clients`` connections (the next one gets ``core.error
{kind: "resource_limit"}`` on id 0 and is closed), 256 open streams per
connection, frames of at most 4 MiB that decode as the protocol's envelope
(otherwise ``core.error {kind: "malformed" | "oversized"}`` on id 0 and the
client is disconnected; the others are unaffected). Memory stays bounded:
frames for a client are written to its socket and, once more than 2 MiB wait
there, the relay stops reading from the agent until that client drained to
512 KiB. The agent channel is one ordered stream, so a client that does not
read stalls the others: after ``stall_timeout`` seconds (default 10, below
the agent's own 30 s write stall limit) it is disconnected.

Example::

    upstream = await machine.astart()            # hello + bootstrap done
    relay = AgentRelay(upstream, upstream.ready, on_activity=touch)
    await relay.serve_unix(sandbox_dir / "agent.sock")
    ...                                          # clients: AgentClient.connect_unix(...)
    await relay.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microvm.agent import AgentClient
from microvm.agent.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    TERMINAL,
    Frame,
    ProtocolError,
    ReadyInfo,
    decode_body,
    encode_frame,
)
from microvm.errors import AgentError, SandboxConfigError, SandboxError

__all__ = ["AgentRelay"]

log = logging.getLogger("microvm.sandbox.relay")

HIGH_WATER = 2 * 1024 * 1024  # bytes waiting in a client's socket before the agent is paused
LOW_WATER = 512 * 1024  # ... and resumed
MAX_STREAMS = 256  # open streams per client connection (the agent runs at most 256 sessions)
ABANDON_TIMEOUT = 30.0  # an abandoned stream that does not end by then is forgotten
CLOSE_TIMEOUT = 5.0  # close(): how long abandoned streams may take to end
READ_LIMIT = 256 * 1024  # client socket read buffer (the reader pauses the socket above 2x)
_CONTROL = frozenset({"core.exec.stdin", "core.exec.resize", "core.exec.signal", "core.fs.data"})
_RESERVED = frozenset({"core.bootstrap", "core.shutdown"})
_UNIX_PATH_MAX = 107


class _BadFrame(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(eq=False)
class _Stream:
    """One client request in flight: client id ``cid`` on ``conn`` <-> upstream id ``uid``."""

    conn: _Conn
    cid: int
    uid: int
    kind: str  # "exec", "write" (streamed fs write) or "request"
    path: str = ""
    append: bool = False
    sending: bool = False  # a streamed write whose end the client has not sent yet
    started: bool = False  # core.exec.started seen
    abandoned: bool = False
    remove_after: bool = False
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    streams: dict[int, _Stream] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None  # the frame-reading task
    handler: asyncio.Task[Any] | None = None  # the task running handle()
    closed: bool = False
    congested: bool = False
    reason: str = "client closed the connection"

    def send(self, frame: Frame) -> bool:
        """Queue one frame to the client; True when its socket holds more than HIGH_WATER."""
        if self.closed or self.writer.transport.is_closing():
            return False
        try:
            data = encode_frame(frame)
        except ProtocolError as e:  # re-encoding grew past MAX_FRAME: tell the client instead
            data = encode_frame(Frame(frame.id, TERMINAL, "core.error", {"kind": "internal", "message": str(e)}))
        self.writer.write(data)
        return self.writer.transport.get_write_buffer_size() > HIGH_WATER


def _error(cid: int, kind: str, message: str) -> Frame:
    return Frame(cid, TERMINAL, "core.error", {"kind": kind, "message": message})


class AgentRelay:
    """Serve the agent protocol to many local clients over one upstream :class:`AgentClient`.

    ``upstream`` must have completed ``hello`` (and ``bootstrap``); ``ready`` is
    its ``core.ready`` answer (default ``upstream.ready``), replayed to every client's
    hello. ``on_activity`` is called (cheaply, often) on every relayed frame;
    :attr:`last_activity`, :attr:`clients` and :attr:`sessions` tell an idle
    supervisor apart from a busy one. See the module docstring for the rules.

    Example::

        relay = AgentRelay(upstream, upstream.ready, max_clients=16)
        await relay.serve_unix(Path("/run/sb/agent.sock"))
        client = await AgentClient.connect_unix("/run/sb/agent.sock")
        await client.hello()
        print((await client.exec("/bin/echo", ["hi"])).stdout)
        await relay.close()
    """

    def __init__(
        self,
        upstream: AgentClient,
        ready: ReadyInfo | None = None,
        *,
        on_activity: Callable[[], None] | None = None,
        max_clients: int = 64,
        stall_timeout: float = 10.0,
    ) -> None:
        if not isinstance(upstream, AgentClient):
            raise SandboxConfigError(f"upstream must be an AgentClient, got {type(upstream).__name__}")
        ready = upstream.ready if ready is None else ready
        if not isinstance(ready, ReadyInfo):
            raise SandboxConfigError(
                f"ready must be the upstream's ReadyInfo (hello done), got {type(ready).__name__}"
            )
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or not 1 <= max_clients <= 4096:
            raise SandboxConfigError(f"max_clients must be an int 1..4096, got {max_clients!r}")
        if isinstance(stall_timeout, bool) or not isinstance(stall_timeout, (int, float)) or not stall_timeout > 0:
            raise SandboxConfigError(f"stall_timeout must be > 0 seconds, got {stall_timeout!r}")
        if on_activity is not None and not callable(on_activity):
            raise SandboxConfigError(f"on_activity must be callable or None, got {on_activity!r}")
        self._up = upstream
        self._ready = ready
        self._on_activity = on_activity
        self._max_clients = max_clients
        self._stall_timeout = float(stall_timeout)
        self._conns: set[_Conn] = set()
        self._uids: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._congested: set[_Conn] = set()
        self._server: asyncio.AbstractServer | None = None
        self._path: Path | None = None
        self._path_ino: tuple[int, int] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._lost: str | None = None
        self._closing = False
        self._last = time.monotonic()

    # ---- public state -------------------------------------------------
    @property
    def clients(self) -> int:
        """Number of connected clients.

        Example::

            if relay.clients == 0 and not relay.sessions: ...   # idle
        """
        return len(self._conns)

    @property
    def sessions(self) -> int:
        """Number of upstream ids the relay holds open (requests in flight, abandoned ones draining).

        Example::

            busy = relay.sessions > 0
        """
        return len(self._uids)

    @property
    def session_ids(self) -> frozenset[int]:
        """The upstream ids counted by :attr:`sessions`.

        Example::

            print(sorted(relay.session_ids))
        """
        return frozenset(self._uids)

    @property
    def last_activity(self) -> float:
        """``time.monotonic()`` of the last frame relayed either way (creation time before any).

        Example::

            idle_for = time.monotonic() - relay.last_activity
        """
        return self._last

    @property
    def buffered(self) -> int:
        """Bytes written to client sockets and not yet taken by them (bounded by the backpressure).

        Example::

            assert relay.buffered < 8 * 1024 * 1024
        """
        return sum(c.writer.transport.get_write_buffer_size() for c in self._conns if not c.closed)

    # ---- serving ------------------------------------------------------
    async def serve_unix(self, path: Path) -> None:
        """Listen on the unix socket ``path`` (mode 0600); returns once listening.

        A stale socket at ``path`` is replaced; any other file there raises
        :class:`SandboxError`.

        Example::

            await relay.serve_unix(Path(sandbox_dir) / "agent.sock")
        """
        path = Path(path)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise SandboxConfigError(f"unix socket path {str(path)!r} is longer than {_UNIX_PATH_MAX} bytes")
        if self._server is not None:
            raise SandboxError(f"relay already serves {self._path}")
        if self._closing:
            raise SandboxError("relay is closed")
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise SandboxError(f"{path} exists and is not a socket; refusing to replace it")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            os.chmod(path, 0o600)  # before listen(): nobody can connect in between
            st = os.lstat(path)
            self._server = await asyncio.start_unix_server(self.handle, sock=sock, limit=READ_LIMIT)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._path, self._path_ino = path, (st.st_dev, st.st_ino)
        self._ensure_watch()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection until it ends (``serve_unix`` calls this per connection).

        Example::

            a, b = socket.socketpair()
            r, w = await asyncio.open_unix_connection(sock=a)
            task = asyncio.create_task(relay.handle(r, w))
            client = await AgentClient.from_socket(b)
        """
        self._ensure_watch()
        refusal: Frame | None = None
        if self._closing:
            refusal = _error(0, "connection_lost", "the sandbox supervisor is closing")
        elif self._lost is not None:
            refusal = _error(0, "connection_lost", self._lost)
        elif len(self._conns) >= self._max_clients:
            refusal = _error(0, "resource_limit", f"the sandbox supervisor serves at most {self._max_clients} clients")
        if refusal is not None:
            log.info("refusing a client: %s", refusal.payload["message"])
            with contextlib.suppress(Exception):
                writer.write(encode_frame(refusal))
            await self._close_writer(writer)
            return
        conn = _Conn(reader, writer)
        writer.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        conn.handler = asyncio.current_task()
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._conns.add(conn)
        try:
            await asyncio.wait({conn.task})
        finally:
            if not conn.task.done():
                conn.task.cancel()
                await asyncio.wait({conn.task})
            await self._disconnect(conn)

    async def close(self) -> None:
        """Stop listening, disconnect every client, kill their exec sessions (idempotent).

        The upstream :class:`AgentClient` stays open: it belongs to the supervisor.

        Example::

            await relay.close()
        """
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        me = asyncio.current_task()
        conns = list(self._conns)
        for conn in conns:
            conn.reason = "the sandbox supervisor closed the relay"
            if conn.task is not None and conn.task is not me:
                conn.task.cancel()
        for conn in conns:
            if conn.task is not None and conn.task is not me:
                await asyncio.wait({conn.task})
            await self._disconnect(conn)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_TIMEOUT)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        handlers = {c.handler for c in conns if c.handler is not None and c.handler is not me and not c.handler.done()}
        if handlers:
            await asyncio.wait(handlers, timeout=CLOSE_TIMEOUT)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait({self._watch})
        if self._server is not None:
            await self._server.wait_closed()
        if self._path is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self._path)
                if (st.st_dev, st.st_ino) == self._path_ino:
                    os.unlink(self._path)
        self._up.resume_reading()

    async def __aenter__(self) -> AgentRelay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- internals ----------------------------------------------------
    def _touch(self) -> None:
        self._last = time.monotonic()
        if self._on_activity is not None:
            try:
                self._on_activity()
            except Exception:
                log.exception("on_activity callback failed")

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _ensure_watch(self) -> None:
        if self._watch is None and not self._closing:
            self._watch = asyncio.get_running_loop().create_task(self._watch_upstream())

    async def _watch_upstream(self) -> None:
        """Wait on an id nothing is ever sent on: its route fails exactly when the channel is lost."""
        wid = self._up.allocate_id()
        try:
            while True:
                try:
                    await self._up.recv_frame(wid)
                except AgentError as e:
                    reason = str(e)
                    break
        finally:
            self._up.release_id(wid)
        self._lost = reason
        log.warning("%s: disconnecting %d clients", reason, len(self._conns))
        for conn in list(self._conns):
            for st in list(conn.streams.values()):
                conn.send(_error(st.cid, "connection_lost", reason))
                if st.task is not None:
                    st.task.cancel()
            conn.streams.clear()
            conn.reason = reason
            if conn.task is not None:
                conn.task.cancel()

    async def _close_writer(self, writer: asyncio.StreamWriter) -> None:
        """Close gracefully (flushing an error frame); abort when the peer does not take it."""
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except Exception:  # TimeoutError included
            writer.transport.abort()

    async def _read_frame(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
        """(header, rest) of the next frame; None at a clean end of stream."""
        try:
            hdr = await reader.readexactly(4)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise _BadFrame("malformed", "connection ended inside a frame header") from None
            return None
        (length,) = struct.unpack(">I", hdr)
        if length > MAX_FRAME:
            raise _BadFrame("oversized", f"frame of {length} bytes exceeds the {MAX_FRAME}-byte maximum")
        if length < 5:
            raise _BadFrame("malformed", f"frame length {length} is below the 5-byte minimum")
        try:
            rest = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise _BadFrame("malformed", "connection ended inside a frame") from None
        return hdr, rest

    async def _serve(self, conn: _Conn) -> None:
        """Read the client's frames and act on each (the connection's task)."""
        try:
            while True:
                got = await self._read_frame(conn.reader)
                if got is None:
                    return
                hdr, rest = got
                cid, flags = struct.unpack_from(">IB", rest)
                try:
                    frame = decode_body(cid, flags, rest[5:])
                except ProtocolError as e:
                    raise _BadFrame("malformed", str(e)) from None
                self._touch()
                await self._on_frame(conn, frame, hdr, rest)
        except _BadFrame as e:
            conn.reason = f"bad frame: {e}"
            log.info("dropping a client: %s", e)
            conn.send(_error(0, e.kind, str(e)))
        except (ConnectionError, OSError) as e:
            conn.reason = str(e)

    async def _on_frame(self, conn: _Conn, frame: Frame, hdr: bytes, rest: bytes) -> None:
        cid, t = frame.id, frame.type
        if t == "core.hello":
            self._hello(conn, frame)
            return
        if t in _RESERVED:
            conn.send(_error(cid, "bad_request", f"{t} is reserved to the sandbox supervisor; clients may not send it"))
            return
        st = conn.streams.get(cid)
        if st is None:
            if t in _CONTROL:
                return  # for a request that already ended: dropped, as the agent does
            if self._lost is not None:
                conn.send(_error(cid, "connection_lost", self._lost))
                return
            if len(conn.streams) >= MAX_STREAMS:
                conn.send(_error(cid, "resource_limit", f"at most {MAX_STREAMS} requests in flight per client"))
                return
            st = self._open(conn, frame)
        elif st.kind == "write" and t == "core.fs.data":
            p = frame.payload
            if frame.flags & TERMINAL or not (isinstance(p, dict) and p.get("data")):
                st.sending = False
        wire = b"".join((hdr, struct.pack(">I", st.uid), memoryview(rest)[4:]))
        with contextlib.suppress(AgentError):  # lost: the watcher tells the client
            await self._up.send_bytes(wire)

    def _hello(self, conn: _Conn, frame: Frame) -> None:
        p = frame.payload if isinstance(frame.payload, dict) else {}
        ver = p.get("version")
        if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1:
            conn.send(_error(frame.id, "version", 'core.hello needs an integer "version" >= 1'))
            return
        r = self._ready
        gen = max(1, min(ver, r.version, r.generation or PROTOCOL_VERSION))
        conn.send(Frame(frame.id, TERMINAL, "core.ready", {
            "version": r.version, "generation": gen, "pid": r.pid, "boot_ms": r.boot_ms,
            "agent": r.agent, "host_mode": r.host_mode,
        }, gen))  # fmt: skip

    def _open(self, conn: _Conn, frame: Frame) -> _Stream:
        uid = self._up.allocate_id()
        self._uids.add(uid)
        kind, path, append, sending = "request", "", False, False
        p = frame.payload if isinstance(frame.payload, dict) else {}
        if frame.type == "core.exec.request":
            kind = "exec"
        elif frame.type == "core.fs.request" and p.get("op") == "write" and p.get("data") is None:
            kind, sending = "write", True
            path = p["path"] if isinstance(p.get("path"), str) else ""
            append = p.get("append") is True
        st = _Stream(conn, frame.id, uid, kind, path=path, append=append, sending=sending)
        conn.streams[frame.id] = st
        st.task = self._spawn(self._pump(st))
        return st

    async def _pump(self, st: _Stream) -> None:
        """Carry the agent's frames for one stream back to its client, until TERMINAL."""
        up = self._up
        ok_response = False
        try:
            while True:
                try:
                    f = await up.recv_frame(st.uid)
                except AgentError:
                    return  # lost: the watcher answers the client's open ids
                self._touch()
                if f.type == "core.exec.started":
                    st.started = True
                if not st.abandoned and st.conn.send(Frame(st.cid, f.flags, f.type, f.payload, f.version)):
                    self._congest(st.conn)
                if not f.terminal:
                    continue
                if st.kind == "exec" and st.started and f.type == "core.error" and not st.abandoned:
                    # An error about a control frame ends the client's id, not the process.
                    await self._abandon(st)
                    continue
                ok_response = f.type == "core.fs.response" and isinstance(f.payload, dict) and f.payload.get("ok") is True
                break
        finally:
            up.release_id(st.uid)
            self._uids.discard(st.uid)
            if st.timer is not None:
                st.timer.cancel()
            if st.conn.streams.get(st.cid) is st:
                del st.conn.streams[st.cid]
        if st.remove_after and ok_response and st.path:
            await self._remove_partial(st.path)

    async def _remove_partial(self, path: str) -> None:
        uid = self._up.allocate_id()
        self._uids.add(uid)
        try:
            await self._up.send_frame(Frame(uid, TERMINAL, "core.fs.request", {"op": "remove", "path": path}))
            f = await self._up.recv_frame(uid, ABANDON_TIMEOUT)
            log.info("removed the partial upload %r of a departed client: %s", path, f.payload)
        except (AgentError, TimeoutError) as e:
            log.warning("could not remove the partial upload %r: %s", path, e)
        finally:
            self._up.release_id(uid)
            self._uids.discard(uid)

    async def _abandon(self, st: _Stream) -> None:
        """The client no longer wants this stream: stop what it started and drain it quietly."""
        if st.abandoned:
            return
        st.abandoned = True
        if st.conn.streams.get(st.cid) is st:
            del st.conn.streams[st.cid]
        if st.task is not None:
            st.timer = asyncio.get_running_loop().call_later(ABANDON_TIMEOUT, st.task.cancel)
        stop: Frame | None = None
        if st.kind == "exec":
            stop = Frame(st.uid, 0, "core.exec.signal", {"signal": 9}, self._up.generation)
        elif st.kind == "write" and st.sending:
            st.remove_after = not st.append
            stop = Frame(st.uid, TERMINAL, "core.fs.data", {"data": b""}, self._up.generation)
        if stop is not None:
            with contextlib.suppress(AgentError):
                await self._up.send_frame(stop)

    def _congest(self, conn: _Conn) -> None:
        if conn.congested or conn.closed:
            return
        conn.congested = True
        if not self._congested:
            self._up.pause_reading()
        self._congested.add(conn)
        self._spawn(self._wait_drained(conn))

    def _decongest(self, conn: _Conn) -> None:
        conn.congested = False
        self._congested.discard(conn)
        if not self._congested:
            self._up.resume_reading()

    async def _wait_drained(self, conn: _Conn) -> None:
        try:
            await asyncio.wait_for(conn.writer.drain(), self._stall_timeout)
        except TimeoutError:
            conn.reason = f"client did not read for {self._stall_timeout} s"
            log.warning("dropping a client: %s", conn.reason)
            conn.writer.transport.abort()
            if conn.task is not None:
                conn.task.cancel()
        except (ConnectionError, OSError) as e:
            conn.reason = str(e)
            if conn.task is not None:
                conn.task.cancel()
        finally:
            self._decongest(conn)

    async def _disconnect(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        if conn.congested:
            self._decongest(conn)
        for st in list(conn.streams.values()):
            await self._abandon(st)
        log.debug("client disconnected: %s", conn.reason)
        await self._close_writer(conn.writer)
