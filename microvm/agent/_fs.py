"""Guest file operations over the agent channel (``core.fs.request``).

:class:`FsOps` adds the file API to :class:`~microvm.agent._connection.AgentConnection`:
whole-file and streamed reads and writes (``core.fs.data`` chunks of at most
:data:`~microvm.agent._connection.CHUNK`), listing, stat, mkdir, remove, rename and
copy. Guest paths are checked (:func:`check_path`) before anything is sent; a
failed operation raises :class:`AgentError` (kind ``fs``) naming the op, the path
and the guest's errno.

Example::

    client = await AgentClient.connect_unix(path)      # an FsOps
    await client.write_file("/tmp/hello.txt", b"hello\\n")
    assert await client.read_file("/tmp/hello.txt") == b"hello\\n"
    print([e.name for e in await client.list_dir("/tmp")])
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

from microvm.agent._connection import CHUNK, AgentConnection
from microvm.agent.protocol import (
    TERMINAL,
    FileStat,
    Frame,
    ProtocolError,
    error_from_payload,
    field_bytes,
    field_int,
    field_str,
    payload_map,
)
from microvm.errors import AgentError

__all__ = ["FsOps", "check_path", "fs_result"]


class FsOps(AgentConnection):
    """The file operations of :class:`~microvm.agent.AgentClient` (a mixin over the connection).

    Example::

        st = await client.stat("/bin/sh")
        await client.copy("/etc/hosts", "/tmp/hosts")
    """

    async def _fs(self, op: str, path: str, timeout: float | None = 60.0, **extra: Any) -> dict[str, Any]:
        check_path(path)
        f = await self._request("core.fs.request", {"op": op, "path": path, **extra}, f"{op} {path!r}", timeout)
        return fs_result(op, path, f)

    async def read_file_chunks(self, path: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream a guest file in chunks (up to 256 KiB each).

        Example::

            async for chunk in client.read_file_chunks("/var/log/app.log"):
                sink.write(chunk)
        """
        check_path(path)
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
                fs_result("read", path, f)
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
        check_path(path)
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
            return int(fs_result("write", path, f).get("size", 0))
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
        check_path(dst)
        await self._fs("rename", src, dst=dst)

    async def copy(self, src: str, dst: str, recursive: bool = False) -> None:
        """Copy a guest file (or a tree with ``recursive=True``), keeping modes and symlinks.

        Example::

            await client.copy("/etc/hosts", "/tmp/hosts")
        """
        check_path(dst)
        await self._fs("copy", src, dst=dst, recursive=recursive)


def check_path(path: str) -> None:
    """Raise :class:`ValueError` unless ``path`` is a usable guest path (non-empty str, no NUL).

    Example::

        >>> check_path("/etc/hosts")
        >>> check_path("")
        Traceback (most recent call last):
        ...
        ValueError: guest path must be a non-empty str without NUL, got ''
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"guest path must be a non-empty str without NUL, got {path!r}")


def fs_result(op: str, path: str, f: Frame) -> dict[str, Any]:
    """The payload of a successful ``core.fs.response``; raise :class:`AgentError` otherwise.

    A failed operation raises kind ``fs`` with the guest's ``errno``/``errno_name``.

    Example::

        >>> fs_result("stat", "/x", Frame(1, 1, "core.fs.response", {"ok": True, "size": 3}))["size"]
        3
    """
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
