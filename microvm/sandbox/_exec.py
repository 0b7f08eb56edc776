"""Exec results and streamed exec handles of a sandbox (async core).

Example::

    out = await sb.exec("/bin/sh", ["-c", "echo hi"])
    assert out.success and out.stdout_text == "hi\\n"

    h = await sb.exec_stream("/bin/cat")
    await h.stdin.write(b"ping")
    await h.stdin.close()
    async for ev in h.events():
        print(ev.kind, ev.data)
    print((await h.wait()).exit_code)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from microvm.agent import ExecEvent, ExecProcess, ExecResult

__all__ = ["AsyncExecHandle", "AsyncExecStdin", "ExecOutput"]


@dataclass(frozen=True)
class ExecOutput:
    """The outcome of a collected exec: ``exit_code`` (-1 when killed by ``signal``),
    ``stdout`` / ``stderr`` bytes, and their decoded forms.

    Example::

        >>> o = ExecOutput(0, b"hi\\n", b"")
        >>> o.success, o.stdout_text
        (True, 'hi\\n')
    """

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    timed_out: bool = False

    @classmethod
    def of(cls, r: ExecResult) -> ExecOutput:
        """From the agent client's :class:`~microvm.agent.ExecResult`.

        Example::

            >>> from microvm.agent import ExecResult
            >>> ExecOutput.of(ExecResult(3, b"x")).exit_code
            3
        """
        return cls(r.exit_code, r.stdout, r.stderr, r.signal, r.timed_out)

    @property
    def success(self) -> bool:
        """True when the command exited with status 0.

        Example::

            >>> ExecOutput(1).success
            False
        """
        return self.exit_code == 0

    @property
    def stdout_text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced).

        Example::

            >>> ExecOutput(0, b"a").stdout_text
            'a'
        """
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded as UTF-8 (invalid bytes replaced).

        Example::

            >>> ExecOutput(0, b"", b"e").stderr_text
            'e'
        """
        return self.stderr.decode("utf-8", "replace")


class AsyncExecStdin:
    """The stdin writer of a streamed exec (flow-controlled by the agent's acks).

    Example::

        await h.stdin.write(b"data"); await h.stdin.close()
    """

    def __init__(self, proc: ExecProcess) -> None:
        self._proc = proc

    async def write(self, data: bytes | str) -> None:
        """Send bytes (a str is UTF-8 encoded) to the process's stdin.

        Example::

            await h.stdin.write("hello\\n")
        """
        await self._proc.write_stdin(data.encode() if isinstance(data, str) else bytes(data))

    async def close(self) -> None:
        """Send EOF.

        Example::

            await h.stdin.close()
        """
        await self._proc.close_stdin()


class AsyncExecHandle:
    """A running command: its events, stdin, signals, resize and final result.

    Example::

        h = await sb.exec_stream("/bin/sleep", ["30"])
        await h.kill()
        print((await h.wait()).signal)    # 9
    """

    def __init__(self, proc: ExecProcess) -> None:
        self._proc = proc
        self.stdin = AsyncExecStdin(proc)

    @property
    def pid(self) -> int:
        """The process id in the guest.

        Example::

            print(h.pid)
        """
        return self._proc.pid

    async def events(self) -> AsyncIterator[ExecEvent]:
        """Events as they come: ``started``, ``stdout``, ``stderr``, ``stdin_error``, ``exited``.

        Example::

            async for ev in h.events():
                print(ev.kind, ev.data)
        """
        async for ev in self._proc:
            yield ev

    async def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group.

        Example::

            await h.signal(15)
        """
        await self._proc.signal(sig)

    async def kill(self) -> None:
        """SIGKILL the process group.

        Example::

            await h.kill()
        """
        await self._proc.kill()

    async def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal of a ``tty=True`` exec.

        Example::

            await h.resize(40, 120)
        """
        await self._proc.resize(rows, cols)

    async def wait(self, timeout: float | None = None) -> ExecOutput:
        """Wait for the exit; the output not consumed through :meth:`events` is collected.

        Example::

            out = await h.wait()
        """
        return ExecOutput.of(await self._proc.wait(timeout))
