"""Host side of the agent protocol: :class:`AgentClient` (asyncio) and :class:`SyncAgentClient`.

Example::

    client = await AgentClient.connect_unix("/run/vm/agent.sock", timeout=30)
    await client.hello()
    await client.bootstrap({"hostname": "box"})
    r = await client.exec("uname", ["-a"], timeout=10)
    print(r.stdout.decode())
    await client.shutdown(exit_code=0)
    await client.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as signal_mod
import socket
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, TypeVar

from microvm.agent.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    SESSION_START,
    TERMINAL,
    ExecEvent,
    ExecResult,
    FileStat,
    Frame,
    FrameDecoder,
    ProtocolError,
    ReadyInfo,
    encode_frame,
    error_from_payload,
    field_bytes,
    field_int,
    field_str,
    payload_map,
)
from microvm.errors import AgentError, ExecTimeout

T = TypeVar("T")
CHUNK = 1024 * 1024  # data bytes per stdin / fs.data frame
STDIN_WINDOW = 8 * 1024 * 1024  # unacknowledged stdin bytes in flight per process (agent buffers 16 MiB)
_LOST = object()  # sentinel put on every route when the channel closes
RLIMIT_NAMES = frozenset(
    ["cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock", "as", "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime"]
)


def _lost_error(reason: str) -> AgentError:
    return AgentError(f"agent connection lost: {reason}", kind="connection_lost")


class AgentClient:
    """Asyncio client for the guest agent over a stream (unix socket or socketpair).

    Example::

        client = await AgentClient.connect_unix(path)
        info = await client.hello()
        result = await client.exec("echo", ["hello"])
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._routes: dict[int, asyncio.Queue[Any]] = {}
        self._stdin_credit: dict[int, Callable[[int], None]] = {}  # id -> ack handler
        self._next_id = 1
        self._send_lock = asyncio.Lock()
        self._closed_reason: str | None = None
        self.ready: ReadyInfo | None = None
        self.generation = PROTOCOL_VERSION
        self.unrouted: list[Frame] = []  # frames for ids nobody waits on (e.g. id-0 errors); last 64
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    # ---- construction -------------------------------------------------
    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> AgentClient:
        """Connect to the agent's unix socket, retrying until it exists and accepts.

        Raises :class:`AgentError` (kind ``connect_timeout``) after ``timeout`` seconds.

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
    async def from_socket(cls, sock: socket.socket) -> AgentClient:
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
            raise _lost_error(self._closed_reason or "closed")
        assert isinstance(item, Frame)
        return item

    async def _send_bytes(self, data: bytes) -> None:
        if self._closed_reason is not None:
            raise _lost_error(self._closed_reason)
        async with self._send_lock:
            self._writer.write(data)
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                raise _lost_error(str(e)) from None

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
                        del self.unrouted[:-64]
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
        rid = self.allocate_id()
        try:
            await self._send(rid, type_, payload, TERMINAL)
            frame = await self.recv_frame(rid, timeout)
            if frame.type == "core.error":
                raise error_from_payload(context, frame.payload)
            return frame
        finally:
            self.release_id(rid)

    # ---- session ------------------------------------------------------
    async def hello(self, version: int = PROTOCOL_VERSION, timeout: float | None = 30.0) -> ReadyInfo:
        """Handshake: send ``core.hello``, return the agent's ``core.ready``.

        Example::

            info = await client.hello()
        """
        f = await self._request("core.hello", {"version": version}, "hello", timeout)
        if f.type != "core.ready":
            raise AgentError(f"hello: expected core.ready, got {f.type!r}", kind="protocol")
        p = payload_map(f)
        info = ReadyInfo(
            version=field_int(p, "version"),
            generation=field_int(p, "generation"),
            pid=field_int(p, "pid"),
            boot_ms=field_int(p, "boot_ms"),
            agent=field_str(p, "agent"),
            host_mode=p.get("host_mode") is True,
        )
        self.ready = info
        self.generation = max(1, info.generation)
        return info

    async def bootstrap(self, config: Mapping[str, Any], timeout: float | None = 60.0) -> dict[str, Any]:
        """Send the one-shot boot config; returns the ack payload (``{"skipped": [...]}``).

        Raises :class:`AgentError` (kind ``bootstrap_failed``/``bad_request``) naming the bad field.

        Example::

            await client.bootstrap({"hostname": "box", "env": {"LANG": "C.UTF-8"}})
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"bootstrap config must be a mapping, got {type(config).__name__}")
        f = await self._request("core.bootstrap", dict(config), "bootstrap", timeout)
        return dict(f.payload) if isinstance(f.payload, dict) else {}

    async def reconfigure(self, config: Mapping[str, Any], timeout: float | None = 30.0) -> list[str]:
        """Give a restored/forked guest a new identity (``core.reconfigure``); returns what
        was applied (``entropy``, ``clock``, ``network``, ``hostname``).

        Raises :class:`AgentError` (kind ``bad_request``/``bootstrap_failed``).

        Example::

            await client.reconfigure({"hostname": "fork-1", "entropy": os.urandom(64),
                                      "clock": {"realtime_ns": time.time_ns()}})
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"reconfigure config must be a mapping, got {type(config).__name__}")
        f = await self._request("core.reconfigure", dict(config), "reconfigure", timeout)
        applied = f.payload.get("applied", []) if isinstance(f.payload, dict) else []
        return [str(x) for x in applied]

    async def ping(self, timeout: float | None = 10.0) -> float:
        """Round-trip ``core.ping``; returns seconds.

        Example::

            rtt = await client.ping()
        """
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await self._request("core.ping", {}, "ping", timeout)
        return loop.time() - t0

    async def metrics(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """Guest metrics: uptime_ms, load, cpu ticks, memory/disk bytes, net counters.

        Example::

            m = await client.metrics()
            print(m["memory"]["available"])
        """
        f = await self._request("core.metrics.request", {}, "metrics", timeout)
        return dict(f.payload) if isinstance(f.payload, dict) else {}

    async def shutdown(self, exit_code: int = 0, timeout: float | None = 10.0) -> int:
        """Ask the agent to sync and power off (the VMM then exits); returns the acked code.

        Example::

            await client.shutdown(exit_code=0)
        """
        if not isinstance(exit_code, int) or not 0 <= exit_code <= 255:
            raise ValueError(f"exit_code must be an int 0..255, got {exit_code!r}")
        f = await self._request("core.shutdown", {"exit_code": exit_code}, "shutdown", timeout)
        return field_int(payload_map(f), "exit_code", exit_code)

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

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- exec ---------------------------------------------------------
    def exec_stream(
        self,
        cmd: str,
        args: Iterable[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        rlimits: Mapping[str, int | tuple[int | None, int | None] | None] | None = None,
        timeout: float | None = None,
        stdin: bool = True,
    ) -> ExecProcess:
        """Start a streamed exec: await it for a process handle, or iterate its events.

        ``rlimits`` maps names (cpu, nofile, as, ...) to a limit or ``(soft, hard)``;
        ``None`` means unlimited. ``timeout`` (seconds) kills the process group in the guest.

        Example::

            proc = await client.exec_stream("cat")
            await proc.write_stdin(b"hi")
            await proc.close_stdin()
            result = await proc.wait()
        """
        payload = build_exec_request(cmd, args, env, cwd, user, tty, rows, cols, rlimits, timeout, stdin)
        return ExecProcess(self, payload, timeout)

    async def exec(
        self,
        cmd: str,
        args: Iterable[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        stdin: bytes | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        rlimits: Mapping[str, int | tuple[int | None, int | None] | None] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to completion and collect its output.

        Raises :class:`ExecTimeout` (with ``.result``) when ``timeout`` expires,
        :class:`AgentError` when it cannot start (``kind``: not_found, bad_cwd, ...).

        Example::

            r = await client.exec("sh", ["-c", "echo out; echo err >&2; exit 3"])
            assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\\n", b"err\\n")
        """
        proc = self.exec_stream(
            cmd, args, env=env, cwd=cwd, user=user, tty=tty, rows=rows, cols=cols,
            rlimits=rlimits, timeout=timeout, stdin=stdin is not None,
        )
        await proc.start()
        if stdin is not None:
            await proc.write_stdin(stdin)
            await proc.close_stdin()
        return await proc.wait()

    # ---- fs -----------------------------------------------------------
    async def _fs(self, op: str, path: str, timeout: float | None = 60.0, **extra: Any) -> dict[str, Any]:
        _check_path(path)
        f = await self._request("core.fs.request", {"op": op, "path": path, **extra}, f"{op} {path!r}", timeout)
        return _fs_result(op, path, f)

    async def read_file_chunks(self, path: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream a guest file in chunks (up to 256 KiB each).

        Example::

            async for chunk in client.read_file_chunks("/var/log/app.log"):
                sink.write(chunk)
        """
        _check_path(path)
        req: dict[str, Any] = {"op": "read", "path": path, "offset": offset}
        if length is not None:
            req["length"] = length
        rid = self.allocate_id()
        try:
            await self._send(rid, "core.fs.request", req, TERMINAL)
            while True:
                f = await self.recv_frame(rid)
                if f.type == "core.fs.data":
                    yield field_bytes(payload_map(f), "data")
                    continue
                _fs_result("read", path, f)
                return
        finally:
            self.release_id(rid)

    async def read_file(self, path: str) -> bytes:
        """Read a whole guest file.

        Example::

            data = await client.read_file("/etc/os-release")
        """
        parts = [c async for c in self.read_file_chunks(path)]
        return b"".join(parts)

    async def write_file_chunks(
        self, path: str, chunks: Iterable[bytes] | AsyncIterator[bytes], mode: int = 0o644,
        append: bool = False, mkdirs: bool = False,
    ) -> int:
        """Stream chunks into a guest file; returns bytes written.

        Example::

            await client.write_file_chunks("/tmp/big", (b"x" * 65536 for _ in range(100)))
        """
        _check_path(path)
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise ValueError(f"mode must be 0..0o7777, got {mode!r}")
        rid = self.allocate_id()
        try:
            await self._send(rid, "core.fs.request",
                             {"op": "write", "path": path, "mode": mode, "append": append, "mkdirs": mkdirs})

            async def send(piece: bytes) -> None:
                for i in range(0, len(piece), CHUNK):
                    await self._send(rid, "core.fs.data", {"data": bytes(piece[i : i + CHUNK])})

            if isinstance(chunks, AsyncIterator):
                async for piece in chunks:
                    if piece:
                        await send(piece)
            else:
                for piece in chunks:
                    if piece:
                        await send(piece)
            await self._send(rid, "core.fs.data", {"data": b""}, TERMINAL)
            f = await self.recv_frame(rid)
            return int(_fs_result("write", path, f).get("size", 0))
        finally:
            self.release_id(rid)

    async def write_file(self, path: str, data: bytes, mode: int = 0o644, mkdirs: bool = False) -> int:
        """Write (create or truncate) a guest file; returns bytes written.

        Example::

            await client.write_file("/tmp/hello.txt", b"hello\\n")
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        return await self.write_file_chunks(path, [bytes(data)], mode=mode, mkdirs=mkdirs)

    async def list_dir(self, path: str) -> list[FileStat]:
        """List a guest directory (entries sorted by name).

        Example::

            names = [e.name for e in await client.list_dir("/")]
        """
        p = await self._fs("list", path)
        raw = p.get("entries", [])
        if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
            raise ProtocolError(f"list {path!r}: 'entries' must be a list of maps")
        entries = [FileStat.from_payload("", e) for e in raw]
        return sorted(entries, key=lambda e: e.name)

    async def stat(self, path: str, follow: bool = True) -> FileStat:
        """Stat a guest path (``follow=False``: the symlink itself, with ``target``).

        Example::

            st = await client.stat("/bin/sh", follow=False)
        """
        p = await self._fs("stat", path, follow=follow)
        return FileStat.from_payload(os.path.basename(path), p)

    async def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> None:
        """Create a guest directory (``parents=True``: like ``mkdir -p``).

        Example::

            await client.mkdir("/work/a/b", parents=True)
        """
        await self._fs("mkdir", path, mode=mode, parents=parents)

    async def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file, an empty directory, or a tree with ``recursive=True``.

        Example::

            await client.remove("/work", recursive=True)
        """
        await self._fs("remove", path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        """Rename a guest path.

        Example::

            await client.rename("/tmp/a", "/tmp/b")
        """
        _check_path(dst)
        await self._fs("rename", src, dst=dst)

    async def copy(self, src: str, dst: str, recursive: bool = False) -> None:
        """Copy a guest file (or a tree with ``recursive=True``), keeping modes and symlinks.

        Example::

            await client.copy("/etc/hosts", "/tmp/hosts")
        """
        _check_path(dst)
        await self._fs("copy", src, dst=dst, recursive=recursive)


def _check_path(path: str) -> None:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"guest path must be a non-empty str without NUL, got {path!r}")


def _fs_result(op: str, path: str, f: Frame) -> dict[str, Any]:
    if f.type == "core.error":
        raise error_from_payload(f"{op} {path!r}", f.payload)
    if f.type != "core.fs.response":
        raise AgentError(f"{op} {path!r}: unexpected {f.type!r}", kind="protocol")
    p = payload_map(f)
    if p.get("ok") is not True:
        raise AgentError(
            f"{op} {path!r}: {field_str(p, 'message', 'failed')}",
            kind="fs", errno=field_int(p, "errno"), errno_name=field_str(p, "errno_name"),
        )
    return p


def build_exec_request(
    cmd: str,
    args: Iterable[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | int | None,
    tty: bool,
    rows: int,
    cols: int,
    rlimits: Mapping[str, int | tuple[int | None, int | None] | None] | None,
    timeout: float | None,
    stdin: bool,
) -> dict[str, Any]:
    """Validate exec arguments and build the ``core.exec.request`` payload.

    Example::

        build_exec_request("ls", ["-l"], None, None, None, False, 24, 80, {"nofile": 64}, 5, True)
    """
    if not isinstance(cmd, str) or not cmd or "\0" in cmd:
        raise ValueError(f"cmd must be a non-empty str without NUL, got {cmd!r}")
    if isinstance(args, str):
        raise TypeError(f"args must be a list of str, not the str {args!r}")
    arglist = list(args)
    for a in arglist:
        if not isinstance(a, str) or "\0" in a:
            raise ValueError(f"every arg must be a str without NUL, got {a!r}")
    p: dict[str, Any] = {"cmd": cmd, "args": arglist, "tty": bool(tty), "stdin": bool(stdin)}
    if env:
        for k, v in env.items():
            if not isinstance(k, str) or not k or "=" in k or "\0" in k or not isinstance(v, str) or "\0" in v:
                raise ValueError(f"env entries must be str KEY (no '=') -> str value, got {k!r}={v!r}")
        p["env"] = dict(env)
    if cwd is not None:
        _check_path(cwd)
        p["cwd"] = cwd
    if user is not None:
        if isinstance(user, bool) or not isinstance(user, (str, int)) or user == "":
            raise ValueError(f"user must be a name, uid or 'uid:gid', got {user!r}")
        p["user"] = user
    for name, val in (("rows", rows), ("cols", cols)):
        if not isinstance(val, int) or not 1 <= val <= 65535:
            raise ValueError(f"{name} must be 1..65535, got {val!r}")
    p["rows"], p["cols"] = rows, cols
    if rlimits:
        rl = []
        for name, lim in rlimits.items():
            if name not in RLIMIT_NAMES:
                raise ValueError(f"unknown rlimit {name!r}; allowed: {', '.join(sorted(RLIMIT_NAMES))}")
            soft, hard = lim if isinstance(lim, tuple) else (lim, lim)
            for lv in (soft, hard):
                if lv is not None and (not isinstance(lv, int) or lv < 0):
                    raise ValueError(f"rlimit {name} values must be ints >= 0 or None, got {lim!r}")
            rl.append({"resource": name, "soft": soft, "hard": hard})
        p["rlimits"] = rl
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        p["timeout_ms"] = max(1, int(timeout * 1000))
    return p


class ExecProcess:
    """A running guest process from :meth:`AgentClient.exec_stream`.

    Await it (or call :meth:`start`) to get the started handle; iterate it for
    :class:`ExecEvent` objects; :meth:`wait` collects whatever was not iterated.

    Example::

        async for ev in client.exec_stream("sh", ["-c", "echo a; echo b >&2"]):
            print(ev.kind, ev.data)
    """

    def __init__(self, client: AgentClient, payload: dict[str, Any], timeout: float | None) -> None:
        self._client = client
        self._payload = payload
        self._timeout = timeout
        self._rid: int | None = None
        self._started: asyncio.Future[None] | None = None
        self._done = False
        self._exit_event: ExecEvent | None = None
        self._pending: list[ExecEvent] = []
        self._inflight = 0  # stdin bytes sent but not yet acknowledged by the agent
        self._ended = False  # the agent reported the end of the process (stdin is moot)
        self._credit = asyncio.Event()
        self.pid = 0
        self.result: ExecResult | None = None

    def __await__(self) -> Generator[Any, None, ExecProcess]:
        return self.start().__await__()

    async def start(self) -> ExecProcess:
        """Send the request and wait for ``started`` (raises :class:`AgentError` on failure).

        Example::

            proc = await client.exec_stream("sleep", ["5"]).start()
        """
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                await self._do_start()
                self._started.set_result(None)
            except BaseException as e:
                self._started.set_exception(e)
                self._started.exception()  # mark retrieved
                raise
        else:
            await self._started
        return self

    async def _do_start(self) -> None:
        c = self._client
        self._rid = c.allocate_id()
        c._stdin_credit[self._rid] = self._on_ack
        try:
            await c._send(self._rid, "core.exec.request", self._payload, SESSION_START)
            while True:
                f = await c.recv_frame(self._rid)
                if f.type == "core.exec.started":
                    self.pid = field_int(payload_map(f), "pid")
                    return
                if f.type in ("core.exec.failed", "core.error"):
                    self._finish()
                    raise error_from_payload(f"exec {self._payload['cmd']!r}", f.payload)
                ev = self._event(f)  # output may not precede started, but be lenient
                if ev is not None:
                    self._pending.append(ev)
        except BaseException:
            self._finish()
            raise

    def _on_ack(self, n: int) -> None:
        # n == -1: the channel is gone; n == -2: the process ended. Wake writers either way.
        if n == -2:
            self._ended = True
        self._inflight = 0 if n < 0 else max(0, self._inflight - n)
        self._credit.set()

    def _finish(self) -> None:
        self._done = True
        self._credit.set()
        if self._rid is not None:
            self._client.release_id(self._rid)
            self._client._stdin_credit.pop(self._rid, None)

    def _event(self, f: Frame) -> ExecEvent | None:
        if f.type == "core.error":
            raise error_from_payload(f"exec {self._payload['cmd']!r}", f.payload)
        p = payload_map(f)
        if f.type == "core.exec.stdout":
            return ExecEvent("stdout", data=field_bytes(p, "data"))
        if f.type == "core.exec.stderr":
            return ExecEvent("stderr", data=field_bytes(p, "data"))
        if f.type == "core.exec.stdin.error":
            return ExecEvent("stdin_error", message=field_str(p, "message"))
        if f.type == "core.exec.exited":
            sig = p.get("signal")
            return ExecEvent(
                "exited", exit_code=field_int(p, "code", -1),
                signal=sig if isinstance(sig, int) and not isinstance(sig, bool) else None,
                timed_out=p.get("timed_out") is True, pid=self.pid,
            )
        return None

    async def next_event(self, timeout: float | None = None) -> ExecEvent | None:
        """The next event, or None after ``exited`` was delivered.

        Example::

            ev = await proc.next_event(timeout=5)
        """
        await self.start()
        if self._pending:
            return self._pending.pop(0)
        if self._done or self._rid is None:
            return None
        while True:
            try:
                f = await self._client.recv_frame(self._rid, timeout)
            except AgentError:
                self._finish()
                raise
            ev = self._event(f)
            if ev is None:
                continue
            if ev.kind == "exited":
                self._exit_event = ev   # wait() after the events were consumed needs it
                self._finish()
            return ev

    def __aiter__(self) -> AsyncIterator[ExecEvent]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[ExecEvent]:
        await self.start()
        yield ExecEvent("started", pid=self.pid)
        while True:
            ev = await self.next_event()
            if ev is None:
                return
            yield ev
            if ev.kind == "exited":
                return

    async def _control(self, type_: str, payload: dict[str, Any]) -> None:
        await self.start()
        if self._done or self._rid is None:
            return
        await self._client._send(self._rid, type_, payload)

    async def write_stdin(self, data: bytes) -> None:
        """Send bytes to the process's stdin (or terminal).

        Example::

            await proc.write_stdin(b"input\\n")
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"stdin data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        await self.start()
        for i in range(0, len(data), CHUNK):
            piece = data[i : i + CHUNK]
            # Flow control: at most STDIN_WINDOW bytes unacknowledged, so nothing is ever dropped.
            while self._inflight and self._inflight + len(piece) > STDIN_WINDOW and not (self._done or self._ended):
                self._credit.clear()
                await self._credit.wait()
                if self._client.closed:
                    raise AgentError("agent connection lost while writing stdin", kind="connection_lost")
            if self._done or self._ended:
                return
            self._inflight += len(piece)
            await self._control("core.exec.stdin", {"data": piece})

    async def close_stdin(self) -> None:
        """Signal end of input (on a tty: the EOF character).

        Example::

            await proc.close_stdin()
        """
        await self._control("core.exec.stdin", {"data": b""})

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal of a ``tty=True`` process (it gets SIGWINCH).

        Example::

            await proc.resize(50, 132)
        """
        for name, v in (("rows", rows), ("cols", cols)):
            if not isinstance(v, int) or not 1 <= v <= 65535:
                raise ValueError(f"{name} must be 1..65535, got {v!r}")
        await self._control("core.exec.resize", {"rows": rows, "cols": cols})

    async def signal(self, sig: int) -> None:
        """Send a signal to the process group.

        Example::

            await proc.signal(signal.SIGTERM)
        """
        if not isinstance(sig, int) or not 1 <= int(sig) <= 64:
            raise ValueError(f"signal must be 1..64, got {sig!r}")
        await self._control("core.exec.signal", {"signal": int(sig)})

    async def kill(self) -> None:
        """SIGKILL the process group.

        Example::

            await proc.kill()
        """
        await self.signal(signal_mod.SIGKILL)

    async def wait(self, timeout: float | None = None) -> ExecResult:
        """Collect remaining output until exit; raises :class:`ExecTimeout` on the exec timeout.

        ``timeout`` here bounds the wait itself (default: the exec timeout + 5 s);
        when it expires the group is SIGKILLed and :class:`ExecTimeout` is raised.

        Example::

            result = await proc.wait()
        """
        await self.start()
        if self.result is not None:
            return self.result
        out, err = bytearray(), bytearray()
        limit = timeout if timeout is not None else (self._timeout + 5 if self._timeout else None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit if limit is not None else None
        exited: ExecEvent | None = None
        client_timeout = False
        while exited is None:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                ev = await self.next_event(remaining)
            except TimeoutError:
                if client_timeout:
                    break
                client_timeout = True
                with contextlib.suppress(AgentError):
                    await self.kill()
                deadline = loop.time() + 5
                continue
            if ev is None:   # the events were consumed elsewhere: their exit stands
                exited = self._exit_event
                break
            if ev.kind == "stdout":
                out += ev.data
            elif ev.kind == "stderr":
                err += ev.data
            elif ev.kind == "exited":
                exited = ev
        if exited is None:
            self._finish()
            result = ExecResult(-1, bytes(out), bytes(err), signal_mod.SIGKILL, True, self.pid)
            self.result = result
            raise ExecTimeout(f"exec {self._payload['cmd']!r}: no exit within the timeout; killed", result)
        result = ExecResult(
            exited.exit_code if exited.exit_code is not None else -1,
            bytes(out), bytes(err), exited.signal, exited.timed_out or client_timeout, self.pid,
        )
        self.result = result
        if result.timed_out:
            secs = self._timeout if self._timeout is not None else limit
            raise ExecTimeout(f"exec {self._payload['cmd']!r} timed out after {secs} s; process group killed", result)
        return result


class SyncAgentClient:
    """Blocking wrapper: runs an :class:`AgentClient` on a background event-loop thread.

    Example::

        with SyncAgentClient.connect_unix("/tmp/vm/agent.sock") as c:
            c.hello()
            print(c.exec("echo", ["hi"]).stdout)
    """

    def __init__(self, client: AgentClient, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self.client = client
        self._loop = loop
        self._thread = thread

    @staticmethod
    def _start_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="microvm-agent-client", daemon=True)
        thread.start()
        return loop, thread

    @classmethod
    def _connect(cls, factory: Callable[[], Coroutine[Any, Any, AgentClient]]) -> SyncAgentClient:
        loop, thread = cls._start_loop()
        try:
            client = asyncio.run_coroutine_threadsafe(factory(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()
            raise
        return cls(client, loop, thread)

    @classmethod
    def connect_unix(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> SyncAgentClient:
        """Connect (retrying until the socket accepts); see :meth:`AgentClient.connect_unix`.

        Example::

            c = SyncAgentClient.connect_unix(path, timeout=10)
        """
        return cls._connect(lambda: AgentClient.connect_unix(path, timeout))

    @classmethod
    def from_socket(cls, sock: socket.socket) -> SyncAgentClient:
        """Wrap a connected stream socket.

        Example::

            c = SyncAgentClient.from_socket(sock)
        """
        return cls._connect(lambda: AgentClient.from_socket(sock))

    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the client's loop and return its result.

        Example::

            info = c.run(c.client.hello())
        """
        async def wrap() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result()

    def hello(self, version: int = PROTOCOL_VERSION, timeout: float | None = 30.0) -> ReadyInfo:
        """See :meth:`AgentClient.hello`.

        Example::

            c.hello(timeout=10)
        """
        return self.run(self.client.hello(version, timeout))

    def bootstrap(self, config: Mapping[str, Any], timeout: float | None = 60.0) -> dict[str, Any]:
        """See :meth:`AgentClient.bootstrap`.

        Example::

            c.bootstrap({"hostname": "box"})
        """
        return self.run(self.client.bootstrap(config, timeout))

    def reconfigure(self, config: Mapping[str, Any], timeout: float | None = 30.0) -> list[str]:
        """See :meth:`AgentClient.reconfigure`.

        Example::

            c.reconfigure({"hostname": "fork-1"})
        """
        return self.run(self.client.reconfigure(config, timeout))

    def ping(self, timeout: float | None = 10.0) -> float:
        """See :meth:`AgentClient.ping`.

        Example::

            c.ping()
        """
        return self.run(self.client.ping(timeout))

    def metrics(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """See :meth:`AgentClient.metrics`.

        Example::

            c.metrics()["memory"]
        """
        return self.run(self.client.metrics(timeout))

    def exec(self, cmd: str, args: Iterable[str] = (), **kw: Any) -> ExecResult:
        """See :meth:`AgentClient.exec` (same keyword arguments).

        Example::

            r = c.exec("echo", ["hi"], timeout=5)
        """
        return self.run(self.client.exec(cmd, list(args), **kw))

    def exec_stream(self, cmd: str, args: Iterable[str] = (), **kw: Any) -> SyncExecProcess:
        """Start a streamed exec; see :meth:`AgentClient.exec_stream`.

        Example::

            p = c.exec_stream("cat")
            p.write_stdin(b"x"); p.close_stdin()
            print(p.wait().stdout)
        """
        proc = self.client.exec_stream(cmd, list(args), **kw)
        self.run(proc.start())
        return SyncExecProcess(self, proc)

    def read_file(self, path: str) -> bytes:
        """See :meth:`AgentClient.read_file`.

        Example::

            c.read_file("/etc/hostname")
        """
        return self.run(self.client.read_file(path))

    def write_file(self, path: str, data: bytes, mode: int = 0o644, mkdirs: bool = False) -> int:
        """See :meth:`AgentClient.write_file`.

        Example::

            c.write_file("/tmp/x", b"data")
        """
        return self.run(self.client.write_file(path, data, mode=mode, mkdirs=mkdirs))

    def list_dir(self, path: str) -> list[FileStat]:
        """See :meth:`AgentClient.list_dir`.

        Example::

            c.list_dir("/")
        """
        return self.run(self.client.list_dir(path))

    def stat(self, path: str, follow: bool = True) -> FileStat:
        """See :meth:`AgentClient.stat`.

        Example::

            c.stat("/bin/sh")
        """
        return self.run(self.client.stat(path, follow))

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> None:
        """See :meth:`AgentClient.mkdir`.

        Example::

            c.mkdir("/a/b", parents=True)
        """
        self.run(self.client.mkdir(path, mode, parents))

    def remove(self, path: str, recursive: bool = False) -> None:
        """See :meth:`AgentClient.remove`.

        Example::

            c.remove("/a", recursive=True)
        """
        self.run(self.client.remove(path, recursive))

    def rename(self, src: str, dst: str) -> None:
        """See :meth:`AgentClient.rename`.

        Example::

            c.rename("/a", "/b")
        """
        self.run(self.client.rename(src, dst))

    def copy(self, src: str, dst: str, recursive: bool = False) -> None:
        """See :meth:`AgentClient.copy`.

        Example::

            c.copy("/a", "/b")
        """
        self.run(self.client.copy(src, dst, recursive))

    def shutdown(self, exit_code: int = 0, timeout: float | None = 10.0) -> int:
        """See :meth:`AgentClient.shutdown`.

        Example::

            c.shutdown(0)
        """
        return self.run(self.client.shutdown(exit_code, timeout))

    def close(self) -> None:
        """Close the client and stop its loop thread.

        Example::

            c.close()
        """
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.run(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncAgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncExecProcess:
    """Blocking handle for a streamed exec (from :meth:`SyncAgentClient.exec_stream`).

    Example::

        p = c.exec_stream("sh", ["-c", "read x; echo $x"])
        p.write_stdin(b"hi\\n")
        assert p.wait().stdout == b"hi\\n"
    """

    def __init__(self, owner: SyncAgentClient, proc: ExecProcess) -> None:
        self._owner = owner
        self.proc = proc

    @property
    def pid(self) -> int:
        """Guest pid of the process.

        Example::

            print(p.pid)
        """
        return self.proc.pid

    def events(self, timeout: float | None = None) -> Iterator[ExecEvent]:
        """Iterate output events until ``exited``.

        Example::

            for ev in p.events():
                print(ev.kind)
        """
        while True:
            ev = self._owner.run(self.proc.next_event(timeout))
            if ev is None:
                return
            yield ev
            if ev.kind == "exited":
                return

    def write_stdin(self, data: bytes) -> None:
        """See :meth:`ExecProcess.write_stdin`.

        Example::

            p.write_stdin(b"x")
        """
        self._owner.run(self.proc.write_stdin(data))

    def close_stdin(self) -> None:
        """See :meth:`ExecProcess.close_stdin`.

        Example::

            p.close_stdin()
        """
        self._owner.run(self.proc.close_stdin())

    def resize(self, rows: int, cols: int) -> None:
        """See :meth:`ExecProcess.resize`.

        Example::

            p.resize(40, 100)
        """
        self._owner.run(self.proc.resize(rows, cols))

    def signal(self, sig: int) -> None:
        """See :meth:`ExecProcess.signal`.

        Example::

            p.signal(15)
        """
        self._owner.run(self.proc.signal(sig))

    def wait(self, timeout: float | None = None) -> ExecResult:
        """See :meth:`ExecProcess.wait`.

        Example::

            r = p.wait()
        """
        return self._owner.run(self.proc.wait(timeout))
