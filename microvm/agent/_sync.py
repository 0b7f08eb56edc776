"""The blocking twin of the agent client: :class:`SyncAgentClient`, :class:`SyncExecProcess`.

Same names, same parameters, same results as :class:`~microvm.agent.AgentClient` and
:class:`~microvm.agent.ExecProcess`, without ``await``: each client owns a
:class:`~microvm._portal.Portal` (a private event loop in a daemon thread) that
runs the async client; every method below is its async twin's signature written
out and one ``portal.run`` call (tests/microvm/test_sync_twins.py keeps the two in
step). Sync-only: :meth:`SyncAgentClient.run` (any coroutine on the client's loop)
and :meth:`SyncExecProcess.events` (the blocking form of ``async for``).

Example (the agent in host mode on a socketpair; a guest's is ``connect_unix``)::

    >>> import socket, subprocess
    >>> from microvm.agent import SyncAgentClient, agent_binary
    >>> host, guest = socket.socketpair()
    >>> agent = subprocess.Popen([str(agent_binary()), "--channel-fd", str(guest.fileno())],
    ...                          pass_fds=[guest.fileno()])
    >>> guest.close()
    >>> with SyncAgentClient.from_socket(host) as c:
    ...     print(c.hello().host_mode, c.exec("echo", ["hi"]).stdout)
    ...     p = c.exec_stream("cat")
    ...     p.write_stdin(b"x"); p.close_stdin()
    ...     print(p.wait().stdout)
    True b'hi\\n'
    b'x'
    >>> agent.wait(10)
    0
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, TypeVar

from microvm._portal import Portal
from microvm.agent._aclient import AgentClient
from microvm.agent._exec import ExecProcess, Rlimits
from microvm.agent.protocol import (
    PROTOCOL_VERSION,
    ExecEvent,
    ExecResult,
    FileStat,
    Frame,
    ReadyInfo,
)

__all__ = ["SyncAgentClient", "SyncExecProcess"]

T = TypeVar("T")


async def _anext(agen: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return None


class SyncAgentClient:
    """Blocking client: an :class:`~microvm.agent.AgentClient` run on its own portal thread.

    ``client`` is the async client (for asyncio code sharing the connection: run its
    coroutines with :meth:`run`).

    Example::

        with SyncAgentClient.connect_unix("/tmp/vm/agent.sock") as c:
            c.hello()
            print(c.exec("echo", ["hi"]).stdout)
    """

    def __init__(self, client: AgentClient, portal: Portal) -> None:
        #: the asyncio client this twin drives (lives on ``portal``'s loop)
        self.client = client
        self.portal = portal

    @classmethod
    def _connect(cls, factory: Coroutine[Any, Any, AgentClient],
                 name: str = "agent-client") -> SyncAgentClient:
        portal = Portal(name)
        try:
            client = portal.run(factory)
        except BaseException:
            portal.close()
            raise
        return cls(client, portal)

    # ---- construction -------------------------------------------------
    @classmethod
    def connect_unix(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> SyncAgentClient:
        """Connect (retrying until the socket accepts); see :meth:`AgentClient.connect_unix`.

        Example::

            c = SyncAgentClient.connect_unix(path, timeout=10)
        """
        if timeout <= 0:   # before a thread is started
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        return cls._connect(AgentClient.connect_unix(path, timeout))

    @classmethod
    def from_socket(cls, sock: socket.socket) -> SyncAgentClient:
        """Wrap a connected stream socket; see :meth:`AgentClient.from_socket`.

        Example::

            c = SyncAgentClient.from_socket(sock)
        """
        return cls._connect(AgentClient.from_socket(sock))

    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the client's loop and return its result (sync only).

        Example::

            info = c.run(c.client.hello())
        """
        return self.portal.run(coro)

    # ---- raw frame tier -----------------------------------------------
    def allocate_id(self) -> int:
        """See :meth:`AgentClient.allocate_id`.

        Example::

            rid = c.allocate_id()
        """
        return self.portal.run_in_loop(self.client.allocate_id)

    def release_id(self, rid: int) -> None:
        """See :meth:`AgentClient.release_id`.

        Example::

            c.release_id(rid)
        """
        self.portal.run_in_loop(lambda: self.client.release_id(rid))

    def send_frame(self, frame: Frame) -> None:
        """See :meth:`AgentClient.send_frame`.

        Example::

            c.send_frame(Frame(rid, TERMINAL, "core.ping", {}))
        """
        self.portal.run(self.client.send_frame(frame))

    def send_bytes(self, data: bytes) -> None:
        """See :meth:`AgentClient.send_bytes`.

        Example::

            c.send_bytes(b"\\x00\\x00\\x00\\x05\\x00\\x00\\x00\\x01\\x00")
        """
        self.portal.run(self.client.send_bytes(data))

    def pause_reading(self) -> None:
        """See :meth:`AgentClient.pause_reading`.

        Example::

            c.pause_reading()
        """
        self.portal.run_in_loop(self.client.pause_reading)

    def resume_reading(self) -> None:
        """See :meth:`AgentClient.resume_reading`.

        Example::

            c.resume_reading()
        """
        self.portal.run_in_loop(self.client.resume_reading)

    def recv_frame(self, rid: int, timeout: float | None = None) -> Frame:
        """See :meth:`AgentClient.recv_frame`.

        Example::

            frame = c.recv_frame(rid, timeout=5)
        """
        return self.portal.run(self.client.recv_frame(rid, timeout))

    # ---- session ------------------------------------------------------
    def hello(self, version: int = PROTOCOL_VERSION, timeout: float | None = 30.0) -> ReadyInfo:
        """See :meth:`AgentClient.hello`.

        Example::

            c.hello(timeout=10)
        """
        return self.portal.run(self.client.hello(version, timeout))

    def bootstrap(self, config: Mapping[str, Any], timeout: float | None = 60.0) -> dict[str, Any]:
        """See :meth:`AgentClient.bootstrap`.

        Example::

            c.bootstrap({"hostname": "box"})
        """
        return self.portal.run(self.client.bootstrap(config, timeout))

    def reconfigure(self, config: Mapping[str, Any], timeout: float | None = 30.0) -> list[str]:
        """See :meth:`AgentClient.reconfigure`.

        Example::

            c.reconfigure({"hostname": "fork-1"})
        """
        return self.portal.run(self.client.reconfigure(config, timeout))

    def ping(self, timeout: float | None = 10.0) -> float:
        """See :meth:`AgentClient.ping`.

        Example::

            c.ping()
        """
        return self.portal.run(self.client.ping(timeout))

    def metrics(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """See :meth:`AgentClient.metrics`.

        Example::

            c.metrics()["memory"]
        """
        return self.portal.run(self.client.metrics(timeout))

    def shutdown(self, exit_code: int = 0, timeout: float | None = 10.0) -> int:
        """See :meth:`AgentClient.shutdown`.

        Example::

            c.shutdown(0)
        """
        return self.portal.run(self.client.shutdown(exit_code, timeout))

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
        rlimits: Rlimits | None = None,
        timeout: float | None = None,
        stdin: bool = True,
    ) -> SyncExecProcess:
        """Start a streamed exec (started when this returns); see :meth:`AgentClient.exec_stream`.

        Example::

            p = c.exec_stream("cat")
            p.write_stdin(b"x"); p.close_stdin()
            print(p.wait().stdout)
        """
        proc = self.client.exec_stream(cmd, args, env=env, cwd=cwd, user=user, tty=tty, rows=rows,
                                       cols=cols, rlimits=rlimits, timeout=timeout, stdin=stdin)
        self.portal.run(proc.start())
        return SyncExecProcess(self, proc)

    def exec(
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
        """See :meth:`AgentClient.exec`.

        Example::

            r = c.exec("echo", ["hi"], timeout=5)
        """
        return self.portal.run(self.client.exec(
            cmd, args, env=env, cwd=cwd, user=user, stdin=stdin, tty=tty, rows=rows, cols=cols,
            rlimits=rlimits, timeout=timeout))

    # ---- fs -----------------------------------------------------------
    def read_file_chunks(self, path: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """See :meth:`AgentClient.read_file_chunks`.

        Example::

            for chunk in c.read_file_chunks("/var/log/app.log"):
                sink.write(chunk)
        """
        agen = self.client.read_file_chunks(path, offset, length)
        try:
            while True:
                chunk = self.portal.run(_anext(agen))
                if chunk is None:
                    return
                yield chunk
        finally:
            if isinstance(agen, AsyncGenerator) and not self.portal.closed:
                with contextlib.suppress(Exception):
                    self.portal.run(agen.aclose())   # an abandoned read frees its id

    def read_file(self, path: str) -> bytes:
        """See :meth:`AgentClient.read_file`.

        Example::

            c.read_file("/etc/hostname")
        """
        return self.portal.run(self.client.read_file(path))

    def write_file_chunks(
        self, path: str, chunks: Iterable[bytes], mode: int = 0o644,
        append: bool = False, mkdirs: bool = False,
    ) -> int:
        """See :meth:`AgentClient.write_file_chunks` (the chunks are pulled on the client's
        loop thread).

        Example::

            c.write_file_chunks("/tmp/big", (b"x" * 65536 for _ in range(100)))
        """
        return self.portal.run(self.client.write_file_chunks(path, chunks, mode, append, mkdirs))

    def write_file(self, path: str, data: bytes, mode: int = 0o644, mkdirs: bool = False) -> int:
        """See :meth:`AgentClient.write_file`.

        Example::

            c.write_file("/tmp/x", b"data")
        """
        return self.portal.run(self.client.write_file(path, data, mode=mode, mkdirs=mkdirs))

    def list_dir(self, path: str) -> list[FileStat]:
        """See :meth:`AgentClient.list_dir`.

        Example::

            c.list_dir("/")
        """
        return self.portal.run(self.client.list_dir(path))

    def stat(self, path: str, follow: bool = True) -> FileStat:
        """See :meth:`AgentClient.stat`.

        Example::

            c.stat("/bin/sh")
        """
        return self.portal.run(self.client.stat(path, follow))

    def mkdir(self, path: str, mode: int = 0o755, parents: bool = False) -> None:
        """See :meth:`AgentClient.mkdir`.

        Example::

            c.mkdir("/a/b", parents=True)
        """
        self.portal.run(self.client.mkdir(path, mode, parents))

    def remove(self, path: str, recursive: bool = False) -> None:
        """See :meth:`AgentClient.remove`.

        Example::

            c.remove("/a", recursive=True)
        """
        self.portal.run(self.client.remove(path, recursive))

    def rename(self, src: str, dst: str) -> None:
        """See :meth:`AgentClient.rename`.

        Example::

            c.rename("/a", "/b")
        """
        self.portal.run(self.client.rename(src, dst))

    def copy(self, src: str, dst: str, recursive: bool = False) -> None:
        """See :meth:`AgentClient.copy`.

        Example::

            c.copy("/a", "/b")
        """
        self.portal.run(self.client.copy(src, dst, recursive))

    # ---- teardown -----------------------------------------------------
    def close(self) -> None:
        """Close the client and stop its portal thread (idempotent).

        Example::

            c.close()
        """
        if self.portal.closed:
            return
        with contextlib.suppress(Exception):
            self.portal.run(self.client.close())
        self.portal.close()

    @property
    def closed(self) -> bool:
        """True once the channel is gone.

        Example::

            assert not c.closed
        """
        return self.client.closed

    def __enter__(self) -> SyncAgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncExecProcess:
    """Blocking handle for a streamed exec (from :meth:`SyncAgentClient.exec_stream`).

    ``proc`` is the async :class:`~microvm.agent.ExecProcess` it drives.

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

    @property
    def result(self) -> ExecResult | None:
        """The result once :meth:`wait` collected it.

        Example::

            p.wait(); print(p.result)
        """
        return self.proc.result

    def start(self) -> SyncExecProcess:
        """See :meth:`ExecProcess.start` (already done by ``exec_stream``; idempotent).

        Example::

            p.start()
        """
        self._owner.portal.run(self.proc.start())
        return self

    def next_event(self, timeout: float | None = None) -> ExecEvent | None:
        """See :meth:`ExecProcess.next_event`.

        Example::

            ev = p.next_event(timeout=5)
        """
        return self._owner.portal.run(self.proc.next_event(timeout))

    def events(self, timeout: float | None = None) -> Iterator[ExecEvent]:
        """Iterate output events until ``exited`` (sync only; each wait bounded by ``timeout``).

        Example::

            for ev in p.events():
                print(ev.kind)
        """
        while True:
            ev = self.next_event(timeout)
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
        self._owner.portal.run(self.proc.write_stdin(data))

    def close_stdin(self) -> None:
        """See :meth:`ExecProcess.close_stdin`.

        Example::

            p.close_stdin()
        """
        self._owner.portal.run(self.proc.close_stdin())

    def resize(self, rows: int, cols: int) -> None:
        """See :meth:`ExecProcess.resize`.

        Example::

            p.resize(40, 100)
        """
        self._owner.portal.run(self.proc.resize(rows, cols))

    def signal(self, sig: int) -> None:
        """See :meth:`ExecProcess.signal`.

        Example::

            p.signal(15)
        """
        self._owner.portal.run(self.proc.signal(sig))

    def kill(self) -> None:
        """See :meth:`ExecProcess.kill`.

        Example::

            p.kill()
        """
        self._owner.portal.run(self.proc.kill())

    def wait(self, timeout: float | None = None) -> ExecResult:
        """See :meth:`ExecProcess.wait`.

        Example::

            r = p.wait()
        """
        return self._owner.portal.run(self.proc.wait(timeout))
