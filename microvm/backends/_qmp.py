"""A minimal blocking QMP client (QEMU Machine Protocol) over a unix socket.

Enough for snapshots: ``stop``/``cont``, migration capabilities, ``getfd`` (a file
descriptor passed with ``SCM_RIGHTS``, so QEMU under ``-sandbox spawn=deny`` can migrate
to an fd instead of an ``exec:`` child), ``migrate``/``migrate-incoming`` and polling
``query-migrate``. Asynchronous events are skipped.

Example::

    with QmpClient.connect(Path("/run/vm/qmp.sock")) as q:
        q.execute("stop")
        print(q.execute("query-status")["status"])    # 'paused'
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from microvm.errors import MicrovmError

__all__ = ["QmpClient", "QmpError"]


class QmpError(MicrovmError):
    """QEMU answered a QMP command with an error, or the monitor went away.

    Example::

        try:
            q.execute("no-such-command")
        except QmpError as e:
            print(e)
    """


class QmpClient:
    """One QMP connection (capabilities negotiated). See the module docstring."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0) -> QmpClient:
        """Connect to QEMU's ``-qmp unix:PATH,server=on,wait=off`` (retrying until
        ``timeout`` while QEMU starts) and negotiate capabilities.

        Raises :class:`QmpError` when the monitor does not answer in time.

        Example::

            q = QmpClient.connect(rundir / "qmp.sock")
        """
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                s.connect(str(path))
                break
            except OSError as e:
                s.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {str(path)!r} did not answer within "
                                   f"{timeout:g}s: {e}") from None
                time.sleep(0.002)
        self = cls(s)
        try:
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting!r}")
            self.execute("qmp_capabilities")
        except BaseException:
            s.close()
            raise
        return self

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise QmpError(f"QMP connection failed: {e}") from None
            if not chunk:
                raise QmpError("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                fd: int | None = None, timeout: float = 30.0) -> Any:
        """Run one command; its ``return`` value. ``fd`` rides along (``SCM_RIGHTS``).

        Raises :class:`QmpError` with QEMU's description on an error answer.

        Example::

            q.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        """
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        self._sock.settimeout(timeout)
        try:
            if fd is not None:
                self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             array.array("i", [fd]))])
            else:
                self._sock.sendall(data)
        except OSError as e:
            raise QmpError(f"QMP {command}: {e}") from None
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command} failed: {err.get('desc', err)}")
            return reply.get("return")

    def wait_migration(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``query-migrate`` until ``completed``; raise :class:`QmpError` on
        ``failed``/``cancelled`` or after ``timeout``.

        Example::

            q.execute("migrate", {"uri": "fd:snap"}); q.wait_migration()
        """
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            info: dict[str, Any] = self.execute("query-migrate") or {}
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                raise QmpError(f"migration still {status!r} after {timeout:g}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def close(self) -> None:
        """Close the connection (idempotent).

        Example::

            q.close()
        """
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
