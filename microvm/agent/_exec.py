"""Guest processes over the agent channel (``core.exec.*``).

:func:`build_exec_request` validates the arguments of an exec (command, args, env,
cwd, user, terminal size, rlimits, timeout) and builds the request payload, before
anything is sent. :class:`ExecProcess` is one running process: it sends the
request, routes its output events, writes stdin under flow control (at most
:data:`STDIN_WINDOW` bytes unacknowledged), forwards resize and signals, and
collects the result. :class:`ExecOps` adds ``exec``/``exec_stream`` to
:class:`~microvm.agent._connection.AgentConnection`.

Example::

    r = await client.exec("sh", ["-c", "echo out; exit 3"], timeout=10)
    assert (r.exit_code, r.stdout) == (3, b"out\\n")
    proc = await client.exec_stream("cat")
    await proc.write_stdin(b"hi"); await proc.close_stdin()
    assert (await proc.wait()).stdout == b"hi"
"""

from __future__ import annotations

import asyncio
import contextlib
import signal as signal_mod
from collections.abc import AsyncIterator, Generator, Iterable, Mapping
from typing import Any, TypeAlias

from microvm.agent._connection import CHUNK, AgentConnection
from microvm.agent._fs import check_path
from microvm.agent.protocol import (
    SESSION_START,
    ExecEvent,
    ExecResult,
    Frame,
    error_from_payload,
    field_bytes,
    field_int,
    field_str,
    payload_map,
)
from microvm.errors import AgentError, ExecTimeout

__all__ = ["RLIMIT_NAMES", "STDIN_WINDOW", "ExecOps", "ExecProcess", "Rlimits", "build_exec_request"]

#: unacknowledged stdin bytes in flight per process (the agent buffers 16 MiB)
STDIN_WINDOW = 8 * 1024 * 1024
#: resource names ``rlimits`` accepts (``setrlimit``'s, lower case, without ``RLIMIT_``)
RLIMIT_NAMES = frozenset(
    ["cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock", "as", "locks",
     "sigpending", "msgqueue", "nice", "rtprio", "rttime"]
)
#: ``rlimits`` argument: name -> limit, ``(soft, hard)`` or None (unlimited)
Rlimits: TypeAlias = Mapping[str, int | tuple[int | None, int | None] | None]


class ExecOps(AgentConnection):
    """The process API of :class:`~microvm.agent.AgentClient` (a mixin over the connection).

    Example::

        r = await client.exec("uname", ["-a"], timeout=10)
    """

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
        rlimits: Rlimits | None = None,
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
        rlimits: Rlimits | None = None,
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


def build_exec_request(
    cmd: str,
    args: Iterable[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    user: str | int | None,
    tty: bool,
    rows: int,
    cols: int,
    rlimits: Rlimits | None,
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
        check_path(cwd)
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

    def __init__(self, client: AgentConnection, payload: dict[str, Any], timeout: float | None) -> None:
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
