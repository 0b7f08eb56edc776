"""A bounded sink for the guest console: the VMM connects to a unix socket and a thread appends
what it receives to ``console.log``, never letting the file grow past a limit (a chatty or
hostile guest cannot fill the host disk; the newest output is kept). QEMU never stalls
the guest on a slow console reader: if this thread falls behind by more than the socket
buffer (hundreds of KiB), QEMU drops console bytes rather than blocking the guest kernel.

Example::

    sink = ConsoleSink(rundir / "console.sock", rundir / "console.log", limit=1 << 20)
    # qemu ... -chardev socket,id=con,path=<rundir>/console.sock,server=off
    sink.close()
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

__all__ = ["ConsoleSink"]


class ConsoleSink:
    """Listen on ``sock_path``; append the first connection's bytes to ``log``, capped at ``limit``.

    When the log would exceed ``limit`` bytes, it is cut to its newest half
    with a ``[microvm: N bytes of console output dropped]`` line in front.

    Example::

        sink = ConsoleSink(Path("/tmp/vm/console.sock"), Path("/tmp/vm/console.log"))
        sink.dropped  # bytes discarded so far
    """

    def __init__(self, sock_path: Path, log: Path, limit: int = 4 << 20) -> None:
        if limit < 4096:
            raise ValueError(f"console limit {limit} too small: at least 4096 bytes")
        self.sock_path = sock_path
        self.log = log
        self.limit = limit
        self.dropped = 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(str(sock_path))
        self._srv.listen(1)
        self._conn: socket.socket | None = None
        self._closed = False
        self._fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._thread = threading.Thread(target=self._run, name="microvm-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._srv.accept()
        except OSError:
            return
        self._conn = conn
        with contextlib.suppress(OSError):
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                self._write(data)
        with contextlib.suppress(OSError):
            conn.close()

    def _write(self, data: bytes) -> None:
        if self._size + len(data) > self.limit:
            self._trim(len(data))
        os.write(self._fd, data[-self.limit // 2 :])
        self._size += min(len(data), self.limit // 2)

    def _trim(self, incoming: int) -> None:
        keep = max(0, self.limit // 2 - incoming)
        with open(self.log, "rb") as f:
            f.seek(max(0, self._size - keep))
            tail = f.read(keep)
        self.dropped += self._size - len(tail) + max(0, incoming - self.limit // 2)
        marker = f"[microvm: {self.dropped} bytes of console output dropped]\n".encode()
        os.ftruncate(self._fd, 0)
        os.write(self._fd, marker + tail)
        self._size = len(marker) + len(tail)

    def close(self) -> None:
        """Stop listening and close the log (idempotent); the reader thread ends with the VMM.

        Example::

            sink.close()
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._srv.close()
        if self._conn is not None:
            # the VMM is normally gone already: let the thread drain up to its EOF first
            self._thread.join(timeout=1)
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
