"""``SshServer``: an SSH server on the host whose sessions run in a sandbox's guest.

No sshd in the guest: paramiko speaks SSH on the host and every request becomes an
agent operation through the sandbox supervisor's relay (one agent connection per SSH
connection; when the SSH connection ends, that agent connection closes and the relay
kills whatever it still runs).

* ``exec``: ``$shell -c CMD`` (the sandbox's shell, user, workdir or the user's home,
  rlimits) with stdout, stderr, stdin (EOF included) and the exit status (128+N when
  killed by signal N); ``signal`` requests go to the process group;
* ``pty-req`` + ``shell``/``exec``: the same on a guest terminal; ``window-change``
  resizes it; ``env`` requests add to the environment (``TERM`` from the pty request);
* the ``sftp`` subsystem: :mod:`microvm.ssh._sftp` (streamed, bounded memory);
* ``scp``: legacy ``scp -O`` runs the guest's own ``scp``; an image without one gets a
  one-line explanation (OpenSSH's default scp mode uses SFTP and always works);
* ``direct-tcpip`` (``ssh -L``): to ``localhost``/``127.0.0.1`` ports of the guest only,
  when the sandbox's network policy allows ingress TCP to that port; bytes go through
  the guest's ``nc`` (busybox), so the image needs one;
* public-key authentication only (passwords and keyboard-interactive refused);
  ``idle_timeout`` closes a connection without traffic for that many seconds.

Example::

    from microvm import Sandbox
    from microvm.ssh import SshServer

    sb = Sandbox.get("demo")
    server = SshServer(sb, idle_timeout=600)
    server.serve_tcp("127.0.0.1", 2222)      # blocks; ssh -p 2222 root@127.0.0.1
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import posixpath
import re
import signal as signal_mod
import socket
import threading
import time
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import paramiko
from paramiko.common import (
    MSG_CHANNEL_REQUEST,
    cMSG_CHANNEL_FAILURE,
    cMSG_CHANNEL_SUCCESS,
)

from microvm._portal import Portal
from microvm.agent import AgentClient, ExecProcess
from microvm.errors import AgentError, MicrovmError
from microvm.ssh import _keys
from microvm.ssh.errors import SshConfigError, SshError

if TYPE_CHECKING:
    from microvm.sandbox._asandbox import AsyncSandbox
    from microvm.sandbox._sandbox import Sandbox

__all__ = ["SshServer"]

log = logging.getLogger("microvm.ssh")
T = TypeVar("T")
_RECV = 256 * 1024
_SIGNALS = {s.name[3:]: int(s) for s in signal_mod.Signals if s.name.startswith("SIG")
            and not s.name.startswith("SIG_")}
_SCP = re.compile(rb"\s*(?:\S*/)?scp(?:\s|$)")
_AUTH_FAILED: int = paramiko.AUTH_FAILED
_AUTH_SUCCESSFUL: int = paramiko.AUTH_SUCCESSFUL
_OPEN_SUCCEEDED: int = paramiko.OPEN_SUCCEEDED
_OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED: int = \
    paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def _sandbox_of(sandbox: Sandbox | AsyncSandbox | str) -> AsyncSandbox:
    from microvm.sandbox._asandbox import AsyncSandbox
    from microvm.sandbox._sandbox import Sandbox

    if isinstance(sandbox, AsyncSandbox):
        return sandbox
    if isinstance(sandbox, Sandbox):
        return sandbox._sb
    if isinstance(sandbox, str):
        return AsyncSandbox(sandbox)
    raise SshConfigError(f"sandbox must be a Sandbox, an AsyncSandbox or a name, "
                         f"got {type(sandbox).__name__}")


class SshServer:
    """An SSH server for one sandbox (see the module docstring).

    ``host_key``: a paramiko key or a path (default: ``$MICROVM_HOME/ssh/host_ed25519_key``,
    created once). ``authorized_keys``: a path or an iterable of paramiko public keys
    (default: ``$MICROVM_HOME/ssh/authorized_keys``, re-read at every login).
    ``idle_timeout``: seconds without traffic before a connection is closed (None: never).

    Example::

        server = SshServer("demo", idle_timeout=300)
        a, b = socket.socketpair()
        threading.Thread(target=server.serve_socket, args=(a,), daemon=True).start()
        # ... a paramiko client on b ...
        server.close()
    """

    def __init__(self, sandbox: Sandbox | AsyncSandbox | str, *,
                 host_key: paramiko.PKey | str | os.PathLike[str] | None = None,
                 authorized_keys: str | os.PathLike[str] | Iterable[paramiko.PKey] | None = None,
                 idle_timeout: float | None = None) -> None:
        if idle_timeout is not None and (isinstance(idle_timeout, bool) or not isinstance(
                idle_timeout, int | float) or not 0 < idle_timeout < float("inf")):
            raise SshConfigError(f"bad idle_timeout {idle_timeout!r}: seconds > 0 or None")
        if host_key is not None and not isinstance(host_key, paramiko.PKey | str | os.PathLike):
            raise SshConfigError(f"bad host_key {type(host_key).__name__}: a paramiko key or a "
                                 f"path to an OpenSSH ed25519 private key")
        self.sandbox = _sandbox_of(sandbox)
        self.idle_timeout = float(idle_timeout) if idle_timeout is not None else None
        self.host_key: paramiko.PKey = (host_key if isinstance(host_key, paramiko.PKey)
                                        else _keys.host_key(host_key))
        self._keys_path: str | os.PathLike[str] | None = None
        self._keys: list[paramiko.PKey] | None = None
        if authorized_keys is None or isinstance(authorized_keys, str | os.PathLike):
            self._keys_path = authorized_keys
            _keys.load_authorized_keys(authorized_keys)      # a bad file fails here, early
        else:
            self._keys = list(authorized_keys)
            if not all(isinstance(k, paramiko.PKey) for k in self._keys):
                raise SshConfigError("authorized_keys must be a path or paramiko public keys")
        self._closing = threading.Event()
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._portal = Portal("ssh-loop")   # the project's sync-over-async pattern

    # -- plumbing ----------------------------------------------------------------------
    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the server's event loop and wait for its result (from any
        thread but that loop's).

        Example::

            server.call(asyncio.sleep(0))
        """
        return self._portal.run(coro, timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the server's event loop; returns its future.

        Example::

            fut = server.submit(asyncio.sleep(0)); fut.result()
        """
        return self._portal.submit(coro)

    def authorized(self, key: paramiko.PKey) -> bool:
        """True when ``key`` may log in.

        Example::

            assert server.authorized(my_key)
        """
        allowed = self._keys if self._keys is not None else \
            _keys.load_authorized_keys(self._keys_path)
        return _keys.key_allowed(key, allowed)

    # -- serving -----------------------------------------------------------------------
    def serve_socket(self, sock: Any) -> None:
        """Serve one SSH connection on ``sock`` (a connected socket, or any object with
        paramiko's socket methods) until it ends; blocks.

        Example::

            a, b = socket.socketpair()
            threading.Thread(target=server.serve_socket, args=(a,), daemon=True).start()
        """
        t = _Transport(sock)
        t.add_server_key(self.host_key)
        from microvm.ssh._sftp import SftpInterface, SftpServer

        t.set_subsystem_handler("sftp", SftpServer, SftpInterface)
        conn = _Conn(self, t)
        with self._lock:
            if self._closing.is_set():
                t.close()
                return
            self._conns.add(conn)
        try:
            try:
                t.start_server(server=conn)
            except (paramiko.SSHException, EOFError, OSError) as e:
                log.info("ssh handshake failed: %s", e)
                return
            while t.is_active() and not self._closing.is_set():
                ch = t.accept(0.25)
                if ch is not None:
                    conn.accepted(ch)
                if self.idle_timeout is not None and \
                        time.monotonic() - conn.last > self.idle_timeout:
                    log.info("ssh connection idle for %.0f s: closing", self.idle_timeout)
                    break
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def serve_tcp(self, host: str = "127.0.0.1", port: int = 2222,
                  ready: threading.Event | None = None) -> None:
        """Listen on ``host:port`` and serve every connection (a thread each) until
        :meth:`close`; blocks. ``port=0`` picks a free port (see :attr:`port`).

        Example::

            threading.Thread(target=server.serve_tcp, args=("127.0.0.1", 0),
                             daemon=True).start()
        """
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise SshConfigError(f"bad port {port!r}: 0..65535")
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            raise SshConfigError(f"bad listen address {host!r}: an IP address such as "
                                 f"127.0.0.1") from None
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind((host, port))
        except OSError as e:
            lsock.close()
            raise SshError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        lsock.listen(64)
        lsock.settimeout(0.25)
        self._listener = lsock
        if ready is not None:
            ready.set()
        try:
            while not self._closing.is_set():
                try:
                    sock, _ = lsock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._closing.is_set():
                        break
                    raise
                sock.settimeout(None)
                threading.Thread(target=self._serve_quietly, args=(sock,),
                                 name="microvm-ssh-conn", daemon=True).start()
        finally:
            lsock.close()

    def _serve_quietly(self, sock: socket.socket) -> None:
        try:
            self.serve_socket(sock)
        except Exception:      # one connection's failure never stops the listener
            log.exception("ssh connection failed")
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    @property
    def port(self) -> int | None:
        """The port :meth:`serve_tcp` listens on (None before it binds).

        Example::

            print(server.port)
        """
        if self._listener is None:
            return None
        port: int = self._listener.getsockname()[1]
        return port

    def close(self) -> None:
        """Stop listening, close every connection (their guest processes are killed),
        stop the event loop.

        Example::

            server.close()
        """
        self._closing.set()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        self._portal.close()

    def __enter__(self) -> SshServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- transport: paramiko lacks the "signal" channel request ------------------------------
def _channel_request(chan: paramiko.Channel, m: paramiko.Message) -> None:
    pos = m.packet.tell()
    key = m.get_text()
    if key != "signal":
        m.packet.seek(pos)
        paramiko.Channel._handle_request(chan, m)
        return
    want_reply = m.get_boolean()
    name = m.get_text()
    server = chan.transport.server_object
    ok = isinstance(server, _Conn) and server.signal(chan, name)
    if want_reply:
        msg = paramiko.Message()
        msg.add_byte(cMSG_CHANNEL_SUCCESS if ok else cMSG_CHANNEL_FAILURE)
        msg.add_int(chan.remote_chanid)
        chan.transport._send_user_message(msg)


class _Transport(paramiko.Transport):  # type: ignore[misc]
    """A server transport that also understands the ``signal`` channel request."""

    def __init__(self, sock: Any) -> None:
        super().__init__(sock)
        table: dict[int, Any] = dict(paramiko.Transport._channel_handler_table)
        table[MSG_CHANNEL_REQUEST] = _channel_request
        self._channel_handler_table = table


# -- one SSH connection --------------------------------------------------------------------
class _Conn(paramiko.ServerInterface):  # type: ignore[misc]
    """paramiko's server callbacks for one connection, with its agent connection."""

    def __init__(self, server: SshServer, transport: paramiko.Transport) -> None:
        self.server = server
        self.transport = transport
        self.last = time.monotonic()
        self.sessions: dict[int, _Session] = {}
        self.forwards: dict[int, tuple[str, int]] = {}
        self._agent: AgentClient | None = None
        self._agent_lock = threading.Lock()
        self._home: str | None = None
        self._closed = False

    def touch(self) -> None:
        self.last = time.monotonic()

    # -- agent ---------------------------------------------------------------------
    def agent(self) -> AgentClient:
        with self._agent_lock:
            if self._closed:
                raise AgentError("ssh connection closed", kind="connection_lost")
            if self._agent is None or self._agent.closed:
                sb = self.server.sandbox
                if sb.db.get(sb.name).state != "running":
                    raise sb._not_running()
                self._agent = self.server.call(self._connect(), timeout=30)
            return self._agent

    async def _connect(self) -> AgentClient:
        client = await AgentClient.connect_unix(self.server.sandbox.paths.agent_sock, timeout=5)
        await client.hello(timeout=10)
        return client

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.server.call(coro, timeout)

    def exec_defaults(self) -> tuple[str, str | int | None, dict[str, Any] | None]:
        """``(cwd, user, rlimits)`` of a session: the sandbox's, cwd else the user's home."""
        sb = self.server.sandbox
        cwd, user = sb._defaults(None, None)
        return cwd or self.home(user), user, sb._rlimits(None)

    def home(self, user: str | int | None = None) -> str:
        if self._home is None:
            if user is None:
                user = self.server.sandbox._defaults(None, None)[1]
            self._home = self._lookup_home(user)
        return self._home

    def _lookup_home(self, user: str | int | None) -> str:
        want = str(user if user is not None else 0).split(":")[0]
        try:
            passwd = self.call(self.agent().read_file("/etc/passwd"), timeout=30)
        except AgentError:
            return "/"
        for line in passwd.decode(errors="replace").splitlines():
            f = line.split(":")
            if len(f) >= 6 and want in (f[0], f[2]) and f[5].startswith("/"):
                return f[5]
        return "/"

    # -- auth ----------------------------------------------------------------------
    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_none(self, username: str) -> int:
        return _AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        return _AUTH_FAILED

    def check_auth_interactive(self, username: str, submethods: str) -> int:
        return _AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self.touch()
        try:
            ok = self.server.authorized(key)
        except MicrovmError as e:
            log.warning("authorized_keys: %s", e)
            ok = False
        return _AUTH_SUCCESSFUL if ok else _AUTH_FAILED

    # -- channels ------------------------------------------------------------------
    def check_channel_request(self, kind: str, chanid: int) -> int:
        self.touch()
        if kind == "session":
            return _OPEN_SUCCEEDED
        return _OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple[str, int],
                                           destination: tuple[str, int]) -> int:
        self.touch()
        host, port = destination
        if host not in _LOCAL_NAMES or not 1 <= int(port) <= 65535:
            log.info("direct-tcpip to %s:%s refused: only the guest's localhost ports", host, port)
            return _OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        from netstack import Flow

        try:
            remote = str(ipaddress.ip_address(origin[0]))
        except ValueError:
            remote = "127.0.0.1"
        decision = self.server.sandbox.network.policy.evaluate(Flow("ingress", "tcp", remote,
                                                                    int(port)))
        if decision.action != "allow":
            log.info("direct-tcpip to guest port %s refused by the ingress policy", port)
            return _OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        self.forwards[chanid] = ("127.0.0.1", int(port))
        return _OPEN_SUCCEEDED

    def accepted(self, chan: paramiko.Channel) -> None:
        """A channel came out of ``accept``: start a forward for direct-tcpip ones."""
        dest = self.forwards.pop(chan.get_id(), None)
        if dest is not None:
            self._session(chan).start_forward(dest[1])

    def _session(self, chan: paramiko.Channel) -> _Session:
        s = self.sessions.get(chan.get_id())
        if s is None:
            s = self.sessions[chan.get_id()] = _Session(self, chan)
        return s

    def check_channel_pty_request(self, channel: paramiko.Channel, term: bytes, width: int,
                                  height: int, pixelwidth: int, pixelheight: int,
                                  modes: bytes) -> bool:
        self.touch()
        s = self._session(channel)
        s.pty = True
        s.term = term.decode(errors="replace") if isinstance(term, bytes) else str(term)
        s.cols, s.rows = max(1, min(int(width) or 80, 65535)), max(1, min(int(height) or 24, 65535))
        return True

    def check_channel_env_request(self, channel: paramiko.Channel, name: bytes,
                                  value: bytes) -> bool:
        self.touch()
        k = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        v = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if not k or "=" in k or "\0" in k or "\0" in v:
            return False
        self._session(channel).env[k] = v
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        self.touch()
        shell = self.server.sandbox.config.shell
        return self._session(channel).start([shell, "-l"])

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.touch()
        shell = self.server.sandbox.config.shell
        text = command.decode("utf-8", "replace")
        return self._session(channel).start([shell, "-c", text],
                                            scp=bool(_SCP.match(command)))

    def check_channel_window_change_request(self, channel: paramiko.Channel, width: int,
                                            height: int, pixelwidth: int,
                                            pixelheight: int) -> bool:
        self.touch()
        s = self.sessions.get(channel.get_id())
        if s is None:
            return False
        s.resize(max(1, min(int(height), 65535)), max(1, min(int(width), 65535)))
        return True

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        self.touch()
        ok: bool = super().check_channel_subsystem_request(channel, name)
        return ok

    def check_channel_x11_request(self, *a: Any) -> bool:
        return False

    def check_channel_forward_agent_request(self, channel: paramiko.Channel) -> bool:
        return False

    def check_port_forward_request(self, address: str, port: int) -> int | bool:
        return False

    def check_global_request(self, kind: str, msg: paramiko.Message) -> bool:
        return False

    def signal(self, chan: paramiko.Channel, name: str) -> bool:
        self.touch()
        s = self.sessions.get(chan.get_id())
        sig = _SIGNALS.get(name)
        if s is None or sig is None:
            return False
        return s.send_signal(sig)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in list(self.sessions.values()):
            s.kill()
        with self._agent_lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            with contextlib.suppress(Exception):
                self.call(agent.close(), timeout=10)
        with contextlib.suppress(Exception):
            self.transport.close()


class _Session:
    """One session channel: the guest process behind it and its two pumps."""

    def __init__(self, conn: _Conn, chan: paramiko.Channel) -> None:
        self.conn = conn
        self.chan = chan
        self.env: dict[str, str] = {}
        self.pty = False
        self.term: str | None = None
        self.rows, self.cols = 24, 80
        self.proc: ExecProcess | None = None
        self.started = False
        self.done = threading.Event()
        self._size_used = (24, 80)

    def start(self, argv: list[str], *, scp: bool = False) -> bool:
        if self.started:
            return False
        self.started = True
        threading.Thread(target=self._run, args=(argv, scp, None), name="microvm-ssh-session",
                         daemon=True).start()
        return True

    def start_forward(self, port: int) -> None:
        self.started = True
        argv = [self.conn.server.sandbox.config.shell, "-c",
                'command -v nc >/dev/null 2>&1 || { echo "no nc in the guest" >&2; exit 127; }; '
                'exec nc 127.0.0.1 "$1"', "sh", str(port)]
        threading.Thread(target=self._run, args=(argv, False, port),
                         name="microvm-ssh-forward", daemon=True).start()

    def resize(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        proc = self.proc
        if proc is not None and not self.done.is_set():
            self._size_used = (rows, cols)
            self.conn.server.submit(_quiet(proc.resize(rows, cols)))

    def send_signal(self, sig: int) -> bool:
        proc = self.proc
        if proc is None or self.done.is_set():
            return False
        self.conn.server.submit(_quiet(proc.signal(sig)))
        return True

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and not self.done.is_set():
            with contextlib.suppress(Exception):
                self.conn.call(proc.kill(), timeout=5)

    async def _spawn(self, agent: AgentClient, argv: list[str], env: dict[str, str],
                     cwd: str, user: str | int | None, rlimits: dict[str, Any] | None
                     ) -> ExecProcess:
        proc = agent.exec_stream(argv[0], argv[1:], env=env or None, cwd=cwd, user=user,
                                 tty=self.pty, rows=self.rows, cols=self.cols,
                                 rlimits=rlimits, stdin=True)
        await proc.start()
        return proc

    def _fail(self, message: str, code: int) -> None:
        with contextlib.suppress(Exception):
            self.chan.sendall_stderr(f"microvm ssh: {message}\r\n".encode())
            self.chan.send_exit_status(code)
            self.chan.shutdown_write()
        with contextlib.suppress(Exception):
            self.chan.close()

    def _run(self, argv: list[str], scp: bool, forward: int | None) -> None:
        conn = self.conn
        try:
            agent = conn.agent()
            cwd, user, rlimits = conn.exec_defaults()
            if scp:
                probe = conn.call(agent.exec(argv[0], ["-c", "command -v scp"], cwd=cwd,
                                             user=user, timeout=30), timeout=40)
                if probe.exit_code != 0:
                    self._fail("this sandbox's image has no scp program, so legacy scp (-O) "
                               "cannot run; use scp without -O (its default SFTP mode) or "
                               "sftp, or add scp to the image", 127)
                    return
            env = dict(self.env)
            if self.pty and self.term:
                env["TERM"] = self.term
            self._size_used = (self.rows, self.cols)
            proc = conn.call(self._spawn(agent, argv, env, cwd, user, rlimits), timeout=60)
        except (AgentError, ValueError, MicrovmError) as e:
            self._fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 255)
            return
        self.proc = proc
        if (self.rows, self.cols) != self._size_used:
            self.resize(self.rows, self.cols)
        threading.Thread(target=self._pump_in, name="microvm-ssh-stdin", daemon=True).start()
        code = self._pump_out()
        self.done.set()
        with contextlib.suppress(Exception):
            if forward is None:
                self.chan.send_exit_status(code)
            self.chan.shutdown_write()
        with contextlib.suppress(Exception):
            self.chan.close()
        conn.sessions.pop(self.chan.get_id(), None)

    def _pump_out(self) -> int:
        proc = self.proc
        assert proc is not None
        conn = self.conn
        while True:
            try:
                ev = conn.call(proc.next_event())
            except (AgentError, concurrent.futures.CancelledError, RuntimeError):
                return 255
            if ev is None:
                return 255
            conn.touch()
            try:
                if ev.kind == "stdout":
                    self.chan.sendall(ev.data)
                elif ev.kind == "stderr":
                    self.chan.sendall_stderr(ev.data)
                elif ev.kind == "exited":
                    if ev.exit_code is not None and ev.exit_code >= 0:
                        return ev.exit_code
                    return 128 + (ev.signal or 0)
            except (OSError, EOFError, paramiko.SSHException):
                self.kill()        # the client went away: nothing may keep running for it
                return 255

    def _pump_in(self) -> None:
        proc = self.proc
        assert proc is not None
        conn, chan = self.conn, self.chan
        while not self.done.is_set():
            try:
                data = chan.recv(_RECV)
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            if not data:
                break
            conn.touch()
            try:
                conn.call(proc.write_stdin(data))
            except (AgentError, RuntimeError):
                return
        if self.done.is_set():
            return
        if chan.closed or not chan.eof_received:
            self.kill()               # closed without EOF: the client is gone
            return
        with contextlib.suppress(Exception):
            conn.call(proc.close_stdin(), timeout=10)
        while not self.done.wait(0.25):  # stdin ended; a channel close still kills
            if chan.closed or not conn.transport.is_active():
                self.kill()
                return


async def _quiet(coro: Coroutine[Any, Any, None]) -> None:
    with contextlib.suppress(AgentError, ValueError):
        await coro


def _normalize(path: str, home: str) -> str:
    full = posixpath.normpath(posixpath.join(home, path or "."))
    return "/" + full.lstrip("/")
