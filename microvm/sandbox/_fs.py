"""``sandbox.fs``: the guest's files through the agent (async core).

Reads and writes stream in chunks (a large file never sits whole in memory on the
``copy_*`` paths). Errors are :class:`~microvm.errors.AgentError` with the guest's
``errno_name`` (``ENOENT``, ``EACCES``, ...).

Example::

    await sb.fs.write("/tmp/x", b"hello")
    assert await sb.fs.read_text("/tmp/x") == "hello"
    await sb.fs.copy_to_host("/etc/os-release", "/tmp/os-release")
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from microvm.agent import AgentClient, FileStat
from microvm.errors import AgentError

__all__ = ["AsyncSandboxFs"]

_CHUNK = 1 << 20


class AsyncSandboxFs:
    """File operations in one sandbox's guest (see the module docstring)."""

    def __init__(self, agent: Callable[[], Awaitable[AgentClient]]) -> None:
        self._agent = agent

    async def read(self, path: str) -> bytes:
        """The whole file.

        Example::

            data = await sb.fs.read("/etc/hostname")
        """
        return await (await self._agent()).read_file(path)

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The whole file, decoded.

        Example::

            text = await sb.fs.read_text("/etc/hostname")
        """
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644,
                    mkdirs: bool = False) -> int:
        """Create or replace ``path``; returns the bytes written.

        Example::

            await sb.fs.write("/tmp/a.txt", "hi", mkdirs=True)
        """
        payload = data.encode() if isinstance(data, str) else bytes(data)
        return await (await self._agent()).write_file(path, payload, mode=mode, mkdirs=mkdirs)

    async def list(self, path: str) -> list[FileStat]:
        """Directory entries (name, type, size, mode, ...).

        Example::

            names = [e.name for e in await sb.fs.list("/")]
        """
        return await (await self._agent()).list_dir(path)

    async def stat(self, path: str, *, follow: bool = True) -> FileStat:
        """Metadata of ``path``.

        Example::

            st = await sb.fs.stat("/bin/sh", follow=False)
        """
        return await (await self._agent()).stat(path, follow=follow)

    async def exists(self, path: str) -> bool:
        """True when ``path`` exists (a dangling symlink counts).

        Example::

            assert await sb.fs.exists("/etc")
        """
        try:
            await self.stat(path, follow=False)
        except AgentError as e:
            if e.errno_name in ("ENOENT", "ENOTDIR"):
                return False
            raise
        return True

    async def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = False) -> None:
        """Create a directory.

        Example::

            await sb.fs.mkdir("/data/a/b", parents=True)
        """
        await (await self._agent()).mkdir(path, mode=mode, parents=parents)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory tree with ``recursive``.

        Example::

            await sb.fs.remove("/tmp/dir", recursive=True)
        """
        await (await self._agent()).remove(path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        """Rename within the guest.

        Example::

            await sb.fs.rename("/tmp/a", "/tmp/b")
        """
        await (await self._agent()).rename(src, dst)

    async def copy(self, src: str, dst: str, *, recursive: bool = False) -> None:
        """Copy within the guest.

        Example::

            await sb.fs.copy("/etc/hosts", "/tmp/hosts")
        """
        await (await self._agent()).copy(src, dst, recursive=recursive)

    async def copy_from_host(self, host_path: str | os.PathLike[str], guest_path: str, *,
                             mode: int | None = None, mkdirs: bool = False) -> int:
        """Stream a host file into the guest (mode: the host file's unless given).

        Example::

            await sb.fs.copy_from_host("./app.py", "/app/app.py", mkdirs=True)
        """
        src = Path(host_path)
        perm = mode if mode is not None else src.stat().st_mode & 0o7777

        async def chunks() -> AsyncIterator[bytes]:
            with open(src, "rb") as f:
                while True:
                    piece = f.read(_CHUNK)
                    if not piece:
                        return
                    yield piece

        agent = await self._agent()
        return await agent.write_file_chunks(guest_path, chunks(), mode=perm, mkdirs=mkdirs)

    async def copy_to_host(self, guest_path: str, host_path: str | os.PathLike[str]) -> int:
        """Stream a guest file to the host (written to a temp file, then renamed).

        Example::

            await sb.fs.copy_to_host("/var/log/app.log", "./app.log")
        """
        dst = Path(host_path)
        tmp = dst.with_name(f".{dst.name}.part-{os.getpid()}")
        total = 0
        try:
            with open(tmp, "wb") as f:
                async for piece in (await self._agent()).read_file_chunks(guest_path):
                    f.write(piece)
                    total += len(piece)
            os.replace(tmp, dst)
        finally:
            if tmp.exists():
                tmp.unlink()
        return total
