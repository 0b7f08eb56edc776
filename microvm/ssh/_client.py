"""In-process SSH client: a paramiko ``SSHClient`` connected to an :class:`SshServer`
over a socket pair (no TCP port, no authorized_keys entry: a throwaway key pair).

Example::

    from microvm import Sandbox
    with Sandbox.get("demo").ssh() as ssh:
        status, out, err = ssh.exec("uname -r")
        ssh.sftp().put("local.txt", "/tmp/local.txt")
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

import paramiko

from microvm.ssh._keys import generate_ed25519
from microvm.ssh._server import SshServer
from microvm.ssh.errors import SshConfigError, SshError

if TYPE_CHECKING:
    from microvm.sandbox._asandbox import AsyncSandbox
    from microvm.sandbox._sandbox import Sandbox

__all__ = ["SshClient", "connect"]


class SshClient(paramiko.SSHClient):  # type: ignore[misc]
    """A connected ``paramiko.SSHClient`` (everything paramiko offers works) plus
    :meth:`exec`, :meth:`shell` and :meth:`sftp`; :meth:`close` also stops the
    in-process server.

    Example::

        with sb.ssh() as ssh:
            print(ssh.exec("echo hi"))       # (0, b'hi\\n', b'')
    """

    _server: SshServer | None = None
    _thread: threading.Thread | None = None

    def exec(self, command: str, *, stdin: bytes | str | None = None,
             env: dict[str, str] | None = None, timeout: float | None = None
             ) -> tuple[int, bytes, bytes]:
        """Run ``command`` with the sandbox's shell; ``(exit_status, stdout, stderr)``.
        ``stdin`` is sent then closed (EOF); ``timeout`` bounds each wait for data
        (``socket.timeout`` past it).

        Example::

            status, out, err = ssh.exec("cat | wc -c", stdin=b"abc")   # (0, b'3\\n', b'')
        """
        if not isinstance(command, str) or not command:
            raise SshConfigError(f"bad command {command!r}: a non-empty string")
        chan = self._transport_or_fail().open_session()
        try:
            chan.settimeout(timeout)
            for k, v in (env or {}).items():
                chan.set_environment_variable(k, v)
            chan.exec_command(command)
            errbuf = bytearray()

            def read_err() -> None:
                while True:
                    piece = chan.recv_stderr(1 << 16)
                    if not piece:
                        return
                    errbuf.extend(piece)

            t = threading.Thread(target=read_err, daemon=True)
            t.start()
            if stdin is not None:
                chan.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
            chan.shutdown_write()
            out = bytearray()
            while True:
                piece = chan.recv(1 << 16)
                if not piece:
                    break
                out.extend(piece)
            t.join(timeout)
            status: int = chan.recv_exit_status()
            return status, bytes(out), bytes(errbuf)
        finally:
            chan.close()

    def shell(self, *, term: str = "xterm", rows: int = 24, cols: int = 80
              ) -> paramiko.Channel:
        """An interactive shell on a guest terminal (a paramiko ``Channel``: ``send``,
        ``recv``, ``resize_pty``).

        Example::

            ch = ssh.shell(); ch.send(b"echo hi\\n"); print(ch.recv(1024))
        """
        chan: paramiko.Channel = self.invoke_shell(term=term, width=cols, height=rows)
        return chan

    def sftp(self) -> paramiko.SFTPClient:
        """An SFTP client onto the guest's files.

        Example::

            ssh.sftp().get("/etc/os-release", "os-release")
        """
        client: paramiko.SFTPClient = self.open_sftp()
        return client

    def _transport_or_fail(self) -> paramiko.Transport:
        t = self.get_transport()
        if t is None or not t.is_active():
            raise SshError("the SSH connection is closed")
        return t

    def close(self) -> None:
        """Close the connection and stop the in-process server (guest processes it
        still runs are killed).

        Example::

            ssh.close()
        """
        super().close()
        if self._server is not None:
            self._server.close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> SshClient:
        return self


def connect(sandbox: Sandbox | AsyncSandbox | str, *, idle_timeout: float | None = None,
            username: str = "root") -> SshClient:
    """A connected :class:`SshClient` to ``sandbox`` through an in-process
    :class:`SshServer` (throwaway host and client keys; nothing written to disk).

    Example::

        ssh = connect("demo"); print(ssh.exec("true")[0]); ssh.close()
    """
    client_key = generate_ed25519()
    server = SshServer(sandbox, host_key=generate_ed25519(), authorized_keys=[client_key],
                       idle_timeout=idle_timeout)
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.serve_socket, args=(theirs,),
                              name="microvm-ssh-inproc", daemon=True)
    thread.start()
    client = SshClient()
    client._server, client._thread = server, thread
    alias = f"microvm-{server.sandbox.name}"
    client.get_host_keys().add(alias, server.host_key.get_name(), server.host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(alias, sock=ours, username=username, pkey=client_key,
                       look_for_keys=False, allow_agent=False, timeout=30, banner_timeout=30,
                       auth_timeout=30)
    except BaseException as e:
        client.close()
        theirs.close()
        if isinstance(e, paramiko.SSHException):
            raise SshError(f"in-process SSH connection to {server.sandbox.name!r} failed: "
                           f"{e}") from None
        raise
    return client
