"""The ``sftp`` subsystem of :class:`~microvm.ssh.SshServer`, on the guest agent's fs ops.

* reads stream through a 1 MiB window with the next window prefetched (sequential
  ``get`` never holds more than two windows);
* writes at the end of the file are gathered into 1 MiB pieces and streamed into one
  agent ``write`` (append) per open handle, through a bounded queue (a 20 MB ``put``
  holds a few MiB at most); opening with truncate/create is one ``write`` of nothing
  first, so open errors are reported at open; a write elsewhere in the file (rare:
  resumed or random-access writes) goes through the guest's ``dd`` at that offset;
* ``close`` reports a failed streamed write (e.g. ``ENOSPC``) instead of hiding it;
* ``stat``/``lstat``/``listdir``/``mkdir``/``rmdir``/``remove``/``rename`` map to agent
  ops; ``readlink`` reads the link target from ``lstat``; ``symlink`` and ``setstat``
  (size, owner, mode, times) run the guest's ``ln``/``truncate``/``chown``/``chmod``/
  ``touch`` (busybox has them all).

Relative paths are relative to the sandbox's workdir, else the user's home.

Example::

    # with an SshServer serving the connection:
    sftp = client.open_sftp()
    sftp.put("big.iso", "/tmp/big.iso")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno as errno_mod
import stat as stat_mod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import paramiko
from paramiko.sftp import CMD_CLOSE
from paramiko.sftp_server import SFTPServer

from microvm.agent import AgentClient, FileStat
from microvm.errors import AgentError, MicrovmError

if TYPE_CHECKING:
    from microvm.ssh._server import _Conn

__all__ = ["SftpInterface", "SftpServer"]

WINDOW = 1 << 20
FLUSH = 1 << 20
_QUEUE = 2
_TYPES = {"file": stat_mod.S_IFREG, "dir": stat_mod.S_IFDIR, "symlink": stat_mod.S_IFLNK}
_OK: int = paramiko.SFTP_OK
_FAIL: int = paramiko.SFTP_FAILURE
_NOENT: int = paramiko.SFTP_NO_SUCH_FILE
_DENIED: int = paramiko.SFTP_PERMISSION_DENIED


def _errno(e: int) -> int:
    code: int = SFTPServer.convert_errno(e)
    return code


def _code(e: BaseException) -> int:
    if isinstance(e, AgentError) and e.errno:
        return _errno(e.errno)
    return _FAIL


def _attrs(st: FileStat, name: str | None = None) -> paramiko.SFTPAttributes:
    a = paramiko.SFTPAttributes()
    a.filename = name if name is not None else st.name
    a.st_size = st.size
    a.st_uid = st.uid
    a.st_gid = st.gid
    a.st_mode = _TYPES.get(st.type, 0) | st.mode
    a.st_atime = a.st_mtime = st.mtime_ns // 1_000_000_000
    return a


class SftpServer(SFTPServer):  # type: ignore[misc]
    """paramiko's SFTP server, with ``close`` reporting the handle's final status, every
    request counting as activity for the idle timeout, and an exit status at the end.

    Example::

        transport.set_subsystem_handler("sftp", SftpServer, SftpInterface)
    """

    def finish_subsystem(self) -> None:
        # OpenSSH clients (scp in SFTP mode) want an exit status, as sftp-server gives
        with contextlib.suppress(Exception):
            self.sock.send_exit_status(0)
        super().finish_subsystem()

    def _process(self, t: int, request_number: int, msg: paramiko.Message) -> None:
        iface = self.server
        if isinstance(iface, SftpInterface):
            iface.conn.touch()
        if t == CMD_CLOSE:
            pos = msg.packet.tell()
            handle = msg.get_binary()
            h = self.file_table.get(handle)
            if isinstance(h, _Handle):
                rc = h.close_status()
                del self.file_table[handle]
                self._send_status(request_number, rc)
                return
            msg.packet.seek(pos)
        super()._process(t, request_number, msg)


class SftpInterface(paramiko.SFTPServerInterface):  # type: ignore[misc]
    """The SFTP operations of one connection, on the guest agent (module docstring).

    Example::

        transport.set_subsystem_handler("sftp", SftpServer, SftpInterface)
    """

    def __init__(self, server: _Conn, *args: Any, **kwargs: Any) -> None:
        super().__init__(server, *args, **kwargs)
        self.conn = server

    # -- helpers -------------------------------------------------------------------
    def agent(self) -> AgentClient:
        return self.conn.agent()

    def run(self, coro: Any) -> Any:
        return self.conn.call(coro)

    def guest_sh(self, script: str, *args: str) -> tuple[int, str]:
        """Run ``script`` with ``$1..`` = ``args`` in the guest; ``(exit code, stderr)``."""
        sb = self.conn.server.sandbox
        cwd, user, _ = self.conn.exec_defaults()
        r = self.run(self.agent().exec(sb.config.shell, ["-c", script, "sh", *args], cwd=cwd,
                                       user=user, timeout=120))
        return r.exit_code, r.stderr.decode(errors="replace")

    def canonicalize(self, path: str) -> str:
        from microvm.ssh._server import _normalize

        return _normalize(path, self.conn.exec_defaults()[0])

    def _stat(self, path: str, follow: bool) -> paramiko.SFTPAttributes | int:
        p = self.canonicalize(path)
        try:
            st = self.run(self.agent().stat(p, follow=follow))
        except MicrovmError as e:
            return _code(e)
        return _attrs(st, p.rsplit("/", 1)[-1])

    # -- operations ----------------------------------------------------------------
    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        try:
            entries = self.run(self.agent().list_dir(self.canonicalize(path)))
        except MicrovmError as e:
            return _code(e)
        return [_attrs(e) for e in entries]

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        return self._stat(path, True)

    def lstat(self, path: str) -> paramiko.SFTPAttributes | int:
        return self._stat(path, False)

    def open(self, path: str, flags: int, attr: paramiko.SFTPAttributes
             ) -> paramiko.SFTPHandle | int:
        import os

        p = self.canonicalize(path)
        acc = flags & (os.O_WRONLY | os.O_RDWR)
        writable = acc in (os.O_WRONLY, os.O_RDWR)
        readable = acc in (0, os.O_RDWR)
        mode = attr.st_mode & 0o7777 if attr is not None and attr.st_mode is not None else 0o644
        agent = self.agent()
        try:
            try:
                st: FileStat | None = self.run(agent.stat(p, follow=True))
            except AgentError as e:
                if e.errno_name != "ENOENT" or not (flags & os.O_CREAT):
                    raise
                st = None
            if st is not None and st.type == "dir":
                return _errno(errno_mod.EISDIR)
            if st is not None and flags & os.O_CREAT and flags & os.O_EXCL:
                return _errno(errno_mod.EEXIST)
            size = st.size if st is not None else 0
            if writable and (st is None or flags & os.O_TRUNC):
                self.run(agent.write_file(p, b"", mode=mode))   # create/truncate now
                size = 0
        except MicrovmError as e:
            return _code(e)
        return _Handle(self, p, flags, readable=readable, writable=writable, size=size,
                       mode=mode)

    def remove(self, path: str) -> int:
        p = self.canonicalize(path)
        try:
            st = self.run(self.agent().stat(p, follow=False))
            if st.type == "dir":
                return _errno(errno_mod.EISDIR)
            self.run(self.agent().remove(p))
        except MicrovmError as e:
            return _code(e)
        return _OK

    def rename(self, oldpath: str, newpath: str) -> int:
        try:
            self.run(self.agent().rename(self.canonicalize(oldpath), self.canonicalize(newpath)))
        except MicrovmError as e:
            return _code(e)
        return _OK

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        return self.rename(oldpath, newpath)

    def mkdir(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        mode = attr.st_mode & 0o7777 if attr is not None and attr.st_mode is not None else 0o755
        try:
            self.run(self.agent().mkdir(self.canonicalize(path), mode=mode))
        except MicrovmError as e:
            return _code(e)
        return _OK

    def rmdir(self, path: str) -> int:
        p = self.canonicalize(path)
        try:
            st = self.run(self.agent().stat(p, follow=False))
            if st.type != "dir":
                return _errno(errno_mod.ENOTDIR)
            self.run(self.agent().remove(p))
        except MicrovmError as e:
            return _code(e)
        return _OK

    def chattr(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        return self.setstat(self.canonicalize(path), attr)

    def setstat(self, p: str, attr: paramiko.SFTPAttributes) -> int:
        """Apply the set fields of ``attr`` to guest path ``p`` (size, owner, mode, times)."""
        steps = []
        if attr.st_size is not None:
            steps.append(f"truncate -s {int(attr.st_size)} \"$1\"")
        if attr.st_uid is not None and attr.st_gid is not None:
            steps.append(f"chown {int(attr.st_uid)}:{int(attr.st_gid)} \"$1\"")
        if attr.st_mode is not None:
            steps.append(f"chmod {int(attr.st_mode) & 0o7777:o} \"$1\"")
        if attr.st_mtime is not None:
            steps.append(f"touch -c -m -d @{int(attr.st_mtime)} \"$1\"")
        if attr.st_atime is not None:
            steps.append(f"touch -c -a -d @{int(attr.st_atime)} \"$1\"")
        if not steps:
            return _OK
        try:
            code, err = self.guest_sh("set -e; " + "; ".join(steps), p)
        except MicrovmError as e:
            return _code(e)
        if code == 0:
            return _OK
        if "No such file" in err:
            return _NOENT
        if "not permitted" in err or "denied" in err:
            return _DENIED
        return _FAIL

    def readlink(self, path: str) -> str | int:
        try:
            st = self.run(self.agent().stat(self.canonicalize(path), follow=False))
        except MicrovmError as e:
            return _code(e)
        if st.target is None:
            return _errno(errno_mod.EINVAL)
        target: str = st.target
        return target

    def symlink(self, target_path: str, path: str) -> int:
        try:
            code, err = self.guest_sh('exec ln -s -- "$1" "$2"', target_path,
                                      self.canonicalize(path))
        except MicrovmError as e:
            return _code(e)
        if code == 0:
            return _OK
        if "exists" in err:
            return _errno(errno_mod.EEXIST)
        if "No such file" in err:
            return _NOENT
        return _DENIED if "denied" in err else _FAIL


class _Upload:
    """A streamed append to one guest file, fed from the SFTP thread (lives on the loop)."""

    def __init__(self, agent: AgentClient, path: str, mode: int) -> None:
        self.q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=_QUEUE)
        self.task = asyncio.get_running_loop().create_task(
            agent.write_file_chunks(path, self._gen(), mode=mode, append=True))

    async def _gen(self) -> AsyncIterator[bytes]:
        while True:
            piece = await self.q.get()
            if piece is None:
                return
            yield piece

    async def put(self, piece: bytes | None) -> None:
        put = asyncio.ensure_future(self.q.put(piece))
        await asyncio.wait({put, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
        if self.task.done() and piece is not None:
            self.task.result()          # raises the write's error
            raise AgentError("guest write ended early", kind="fs")

    async def finish(self) -> int:
        if not self.task.done():
            await self.put(None)
        return await self.task

    async def abort(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def _new_upload(agent: AgentClient, path: str, mode: int) -> _Upload:
    return _Upload(agent, path, mode)


async def _read_window(agent: AgentClient, path: str, offset: int) -> bytes:
    parts = [c async for c in agent.read_file_chunks(path, offset, WINDOW)]
    return b"".join(parts)


class _Handle(paramiko.SFTPHandle):  # type: ignore[misc]
    """An open guest file (see the module docstring for the streaming rules)."""

    def __init__(self, iface: SftpInterface, path: str, flags: int, *, readable: bool,
                 writable: bool, size: int, mode: int) -> None:
        super().__init__(flags)
        self.iface = iface
        self.path = path
        self.readable = readable
        self.writable = writable
        self.size = size          # writes at this offset are streamed appends
        self.mode = mode
        self._buf = bytearray()
        self._upload: _Upload | None = None
        self._error = _OK
        self._win_off = -1
        self._win = b""
        self._pf: concurrent.futures.Future[bytes] | None = None
        self._pf_off = -1
        self._closed = False

    # -- writing -------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            return _DENIED
        if self._error != _OK:
            return self._error
        self._drop_window()
        if offset == self.size:
            self._buf += data
            self.size += len(data)
            return self._flush() if len(self._buf) >= FLUSH else _OK
        rc = self._finish_upload()
        if rc != _OK:
            return rc
        return self._write_at(offset, bytes(data))

    def _flush(self) -> int:
        if not self._buf:
            return _OK
        piece = bytes(self._buf)
        self._buf.clear()
        try:
            if self._upload is None:
                self._upload = self.iface.run(_new_upload(self.iface.agent(), self.path,
                                                          self.mode))
            self.iface.run(self._upload.put(piece))
        except MicrovmError as e:
            self._error = _code(e)
            return self._error
        return _OK

    def _finish_upload(self) -> int:
        rc = self._flush()
        up, self._upload = self._upload, None
        if up is not None:
            try:
                self.iface.run(up.finish())
            except MicrovmError as e:
                self._error = rc = _code(e)
        return rc if rc != _OK else self._error

    def _write_at(self, offset: int, data: bytes) -> int:
        sb = self.iface.conn.server.sandbox
        try:
            r = self.iface.run(self.iface.agent().exec(
                sb.config.shell, ["-c", 'exec dd of="$1" bs=65536 seek="$2" oflag=seek_bytes '
                                  'conv=notrunc 2>&1', "sh", self.path, str(offset)],
                stdin=data, timeout=120))
        except MicrovmError as e:
            return _code(e)
        if r.exit_code != 0:
            return _DENIED if b"denied" in r.stdout else _FAIL
        self.size = max(self.size, offset + len(data))
        return _OK

    # -- reading -------------------------------------------------------------------
    def _drop_window(self) -> None:
        self._win_off, self._win = -1, b""
        if self._pf is not None:
            self._pf.cancel()
            self._pf = None

    def _prefetch(self, offset: int) -> None:
        self._pf_off = offset
        self._pf = self.iface.conn.server.submit(
            _read_window(self.iface.agent(), self.path, offset))

    def read(self, offset: int, length: int) -> bytes | int:
        if not self.readable:
            return _DENIED
        if self.writable:
            rc = self._finish_upload()
            if rc != _OK:
                return rc
        end = self._win_off + len(self._win)
        if not (self._win_off <= offset < end):
            try:
                pf, self._pf = self._pf, None
                if pf is not None and self._pf_off <= offset < self._pf_off + WINDOW:
                    win, win_off = pf.result(), self._pf_off
                else:
                    if pf is not None:
                        pf.cancel()
                    win, win_off = self.iface.run(_read_window(self.iface.agent(), self.path,
                                                               offset)), offset
            except MicrovmError as e:
                return _code(e)
            self._win, self._win_off = win, win_off
            if len(win) == WINDOW:
                self._prefetch(win_off + WINDOW)
            if not (win_off <= offset < win_off + len(win)):
                return b""
        rel = offset - self._win_off
        return self._win[rel:rel + length]

    # -- metadata and close ----------------------------------------------------------
    def stat(self) -> paramiko.SFTPAttributes | int:
        if self.writable:
            rc = self._finish_upload()
            if rc != _OK:
                return rc
        return self.iface.stat(self.path)

    def chattr(self, attr: paramiko.SFTPAttributes) -> int:
        if self.writable:
            rc = self._finish_upload()
            if rc != _OK:
                return rc
        self._drop_window()
        rc = self.iface.setstat(self.path, attr)
        if rc == _OK and attr.st_size is not None:
            self.size = int(attr.st_size)
        return rc

    def close_status(self) -> int:
        """Flush and end the streamed write; the status the SFTP ``close`` answers."""
        if self._closed:
            return self._error
        self._closed = True
        self._drop_window()
        if not self.writable:
            return _OK
        try:
            return self._finish_upload()
        except Exception:      # the connection is going away
            return _FAIL

    def close(self) -> None:
        self.close_status()
