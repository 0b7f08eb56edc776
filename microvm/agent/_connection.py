"""The agent channel: connect (retrying), framing, request ids, dispatch of incoming frames.

:class:`AgentConnection` owns one stream to the agent and nothing above it: it
connects (retrying until the socket accepts, see :meth:`AgentConnection.connect_unix`),
reads frames with :class:`~microvm.agent.protocol.FrameDecoder` in one reader task,
routes each frame to the queue of its request id, counts stdin credit for exec
sessions, and turns a lost channel into :class:`AgentError` (kind
``connection_lost``) for every waiter. The raw frame tier (:meth:`allocate_id`,
:meth:`send_frame`, :meth:`recv_frame`, :meth:`release_id`) is public for relays
and protocol tests; the typed requests live in :mod:`microvm.agent._aclient`
(session), :mod:`microvm.agent._exec` and :mod:`microvm.agent._fs`.

Example::

    conn = await AgentConnection.connect_unix("/run/vm/agent.sock", timeout=30)
    rid = conn.allocate_id()
    await conn.send_frame(Frame(rid, TERMINAL, "core.ping", {}))
    print((await conn.recv_frame(rid, timeout=5)).type)     # core.pong
    conn.release_id(rid)
    await conn.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any, Self

from microvm.agent.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    TERMINAL,
    Frame,
    FrameDecoder,
    ProtocolError,
    ReadyInfo,
    encode_frame,
    error_from_payload,
)
from microvm.errors import AgentError

__all__ = ["CHUNK", "AgentConnection", "lost_error"]

#: data bytes per stdin / fs.data frame
CHUNK = 1024 * 1024
_LOST = object()  # sentinel put on every route when the channel closes
_UNROUTED_KEEP = 64


def lost_error(reason: str) -> AgentError:
    """The error every waiter gets once the channel is gone.

    Example::

        >>> lost_error("EOF").kind
        'connection_lost'
    """
    return AgentError(f"agent connection lost: {reason}", kind="connection_lost")


class AgentConnection:
    """One stream to the agent (unix socket or socketpair): ids, routes, the reader task.

    Example::

        conn = await AgentConnection.from_socket(sock)
        assert not conn.closed
        await conn.close()
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._routes: dict[int, asyncio.Queue[Any]] = {}
        self._stdin_credit: dict[int, Callable[[int], None]] = {}  # id -> ack handler
        self._next_id = 1
        self._send_lock = asyncio.Lock()
        self._closed_reason: str | None = None
        #: the agent's ``core.ready`` once ``hello`` was answered
        self.ready: ReadyInfo | None = None
        #: protocol generation spoken on this channel (``min(host, guest)`` after hello)
        self.generation = PROTOCOL_VERSION
        #: frames for ids nobody waits on (e.g. id-0 errors); the last 64
        self.unrouted: list[Frame] = []
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    # ---- construction -------------------------------------------------
    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> Self:
        """Connect to the agent's unix socket, retrying until it exists and accepts.

        Raises :class:`AgentError` (kind ``connect_timeout``) after ``timeout`` seconds,
        :class:`ValueError` for ``timeout <= 0``.

        Example::

            client = await AgentClient.connect_unix("/tmp/vm/agent.sock", timeout=10)
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(os.fspath(path), limit=MAX_FRAME * 2)
                return cls(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                last = e
            if loop.time() >= deadline:
                raise AgentError(
                    f"agent socket {os.fspath(path)!r} not reachable after {timeout} s: {last}",
                    kind="connect_timeout",
                )
            await asyncio.sleep(0.02)

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> Self:
        """Wrap a connected stream socket (e.g. one end of a ``socketpair``).

        Example::

            host, guest = socket.socketpair()
            client = await AgentClient.from_socket(host)
        """
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME * 2)
        return cls(reader, writer)

    # ---- raw frame tier -----------------------------------------------
    def allocate_id(self) -> int:
        """Reserve a request id and open its route (receive with :meth:`recv_frame`).

        Example::

            rid = client.allocate_id()
            await client.send_frame(Frame(rid, 0, "core.ping", {}))
            reply = await client.recv_frame(rid)
            client.release_id(rid)
        """
        while True:
            rid = self._next_id
            self._next_id = self._next_id + 1 if self._next_id < 0xFFFFFFFF else 1
            if rid not in self._routes:
                self._routes[rid] = asyncio.Queue()
                if self._closed_reason is not None:
                    self._routes[rid].put_nowait(_LOST)
                return rid

    def release_id(self, rid: int) -> None:
        """Forget a request id; later frames for it are dropped.

        Example::

            client.release_id(rid)
        """
        self._routes.pop(rid, None)

    async def send_frame(self, frame: Frame) -> None:
        """Send one frame as is (raw tier).

        Example::

            await client.send_frame(Frame(rid, TERMINAL, "core.ping", {}))
        """
        await self._send_bytes(encode_frame(frame))

    async def send_bytes(self, data: bytes) -> None:
        """Write raw bytes to the channel (for protocol tests: malformed frames).

        Example::

            await client.send_bytes(b"\\x00\\x00\\x00\\x05\\x00\\x00\\x00\\x01\\x00")
        """
        await self._send_bytes(data)

    def pause_reading(self) -> None:
        """Stop reading from the agent until :meth:`resume_reading` (backpressure for a relay).

        Frames already received stay queued; the agent blocks writing once the
        channel's buffers are full, so pause only briefly.

        Example::

            client.pause_reading()      # a downstream consumer is full
            client.resume_reading()     # it drained
        """
        transport = self._writer.transport
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self) -> None:
        """Undo :meth:`pause_reading`.

        Example::

            client.resume_reading()
        """
        transport = self._writer.transport
        if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
            transport.resume_reading()

    async def recv_frame(self, rid: int, timeout: float | None = None) -> Frame:
        """Next frame for an allocated id; raises :class:`AgentError` if the channel closed.

        Example::

            frame = await client.recv_frame(rid, timeout=5)
        """
        q = self._routes.get(rid)
        if q is None:
            raise AgentError(f"request id {rid} is not allocated", kind="bad_request")
        item = await asyncio.wait_for(q.get(), timeout)
        if item is _LOST:
            q.put_nowait(_LOST)
            raise lost_error(self._closed_reason or "closed")
        assert isinstance(item, Frame)
        return item

    async def _send_bytes(self, data: bytes) -> None:
        if self._closed_reason is not None:
            raise lost_error(self._closed_reason)
        async with self._send_lock:
            self._writer.write(data)
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                raise lost_error(str(e)) from None

    async def _send(self, rid: int, type_: str, payload: Any, flags: int = 0) -> None:
        await self._send_bytes(encode_frame(Frame(rid, flags, type_, payload, self.generation)))

    async def _read_loop(self) -> None:
        dec = FrameDecoder()
        reason = "agent closed the channel"
        try:
            while True:
                data = await self._reader.read(256 * 1024)
                if not data:
                    break
                for frame in dec.feed(data):
                    q = self._routes.get(frame.id)
                    if frame.type == "core.exec.stdin.ack":
                        # Our own exec sessions count their stdin credit here; an id without a
                        # credit handler (a relay's raw route) gets the ack like any frame.
                        handler = self._stdin_credit.get(frame.id)
                        acked = frame.payload.get("bytes") if isinstance(frame.payload, dict) else None
                        if handler is not None and isinstance(acked, int):
                            handler(acked)
                        elif handler is None and q is not None:
                            q.put_nowait(frame)
                        continue
                    if frame.terminal and frame.id in self._stdin_credit:
                        self._stdin_credit[frame.id](-2)  # the process is gone: stop writing stdin
                    if q is not None:
                        q.put_nowait(frame)
                    else:
                        self.unrouted.append(frame)
                        del self.unrouted[:-_UNROUTED_KEEP]
        except ProtocolError as e:
            reason = f"undecodable data from the agent: {e}"
        except (ConnectionError, OSError) as e:
            reason = str(e)
        except asyncio.CancelledError:
            reason = "client closed"
        finally:
            self._closed_reason = reason
            for q in self._routes.values():
                q.put_nowait(_LOST)
            for handler in list(self._stdin_credit.values()):
                handler(-1)

    async def _request(self, type_: str, payload: Any, context: str, timeout: float | None = None) -> Frame:
        """One request, one TERMINAL answer; a ``core.error`` answer raises (typed)."""
        rid = self.allocate_id()
        try:
            await self._send(rid, type_, payload, TERMINAL)
            frame = await self.recv_frame(rid, timeout)
            if frame.type == "core.error":
                raise error_from_payload(context, frame.payload)
            return frame
        finally:
            self.release_id(rid)

    # ---- teardown -----------------------------------------------------
    async def close(self) -> None:
        """Close the channel (running guest processes follow the kill_on_disconnect policy).

        Example::

            await client.close()
        """
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    @property
    def closed(self) -> bool:
        """True once the channel is gone.

        Example::

            assert not client.closed
        """
        return self._closed_reason is not None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
