"""``microvm ssh``: serve a sandbox over SSH, authorize keys, print an ssh_config block,
or open a session with the in-process client.

Exit status: 2 for a bad command line (one line on stderr, nothing started); 1 when
the sandbox cannot be reached; ``microvm ssh NAME [CMD]`` exits with the remote status.

Example::

    microvm ssh authorize ~/.ssh/id_ed25519.pub
    microvm ssh config demo >> ~/.ssh/config     # then: ssh demo, sftp demo, rsync -e ssh
    microvm ssh serve demo --listen 127.0.0.1:2222
    microvm ssh demo uname -a
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import paramiko

    from microvm.ssh._client import SshClient

__all__ = ["parse_listen", "ssh", "ssh_config_block"]


class _SshGroup(click.Group):
    """``microvm ssh NAME [CMD]`` is ``microvm ssh connect NAME [CMD]``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["connect", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_SshGroup)
def ssh() -> None:
    """SSH into sandboxes (paramiko on the host, no sshd in the guest).

    \b
    Example:
        microvm ssh authorize ~/.ssh/id_ed25519.pub
        microvm ssh config demo >> ~/.ssh/config && ssh demo
        microvm ssh demo uname -a
    """


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> ``(host, port)``; raises
    ``click.BadParameter`` naming the bad value.

    Example::

        >>> parse_listen("127.0.0.1:2222")
        ('127.0.0.1', 2222)
    """
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        n = int(port)
    except ValueError:
        n = -1
    if not sep or not 0 <= n <= 65535:
        raise click.BadParameter(f"bad listen address {value!r}: HOST:PORT with an IP address "
                                 f"and a port 0..65535, e.g. 127.0.0.1:2222")
    return host, n


def _check_sandbox(name: str) -> None:
    from microvm.errors import SandboxConfigError
    from microvm.sandbox._config import validate_name

    try:
        validate_name(name)
    except SandboxConfigError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None


def _timeout(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0 < value < float("inf"):
        raise click.BadParameter(f"{value!r}: seconds > 0", ctx=ctx, param=param)
    return value


@ssh.command("serve")
@click.argument("name")
@click.option("--listen", metavar="HOST:PORT", default=None,
              help="listen on this TCP address (default 127.0.0.1:2222)")
@click.option("--stdio", is_flag=True, help="one connection on stdin/stdout (ProxyCommand)")
@click.option("--idle-timeout", type=float, default=None, callback=_timeout,
              help="close connections idle this many seconds")
@click.option("--host-key", type=click.Path(dir_okay=False), default=None,
              help="ed25519 host key (default $MICROVM_HOME/ssh/host_ed25519_key)")
@click.option("--authorized-keys", type=click.Path(dir_okay=False), default=None,
              help="default $MICROVM_HOME/ssh/authorized_keys")
def serve(name: str, listen: str | None, stdio: bool, idle_timeout: float | None,
          host_key: str | None, authorized_keys: str | None) -> None:
    """Serve sandbox NAME over SSH on a TCP port or on stdin/stdout.

    Example: microvm ssh serve demo --listen 127.0.0.1:2222
    """
    if listen is not None and stdio:
        raise click.UsageError("--listen and --stdio exclude each other")
    host, port = parse_listen(listen or "127.0.0.1:2222")
    _check_sandbox(name)
    from microvm.ssh._server import SshServer

    server = SshServer(name, host_key=host_key, authorized_keys=authorized_keys,
                       idle_timeout=idle_timeout)
    _ = server.sandbox.db.get(name)          # SandboxNotFound before serving
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if stdio:
            _serve_stdio(server)
        else:
            ready = threading.Event()
            t = threading.Thread(target=_announce, args=(server, ready), daemon=True)
            t.start()
            server.serve_tcp(host, port, ready=ready)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _announce(server: Any, ready: threading.Event) -> None:
    if ready.wait(30):
        click.echo(f"microvm ssh: serving {server.sandbox.name!r} on port {server.port}",
                   err=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _serve_stdio(server: Any) -> None:
    """One connection over stdin/stdout, through a socket pair (paramiko wants a socket)."""
    ours, theirs = socket.socketpair()

    def stdin_to_sock() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(0, 1 << 16):
                theirs.sendall(data)
        with contextlib.suppress(OSError):
            theirs.shutdown(socket.SHUT_WR)

    def sock_to_stdout() -> None:
        with contextlib.suppress(OSError):
            while data := theirs.recv(1 << 16):
                _write_all(1, data)

    threading.Thread(target=stdin_to_sock, daemon=True).start()
    out = threading.Thread(target=sock_to_stdout, daemon=True)
    out.start()
    try:
        server.serve_socket(ours)
    finally:
        ours.close()
        out.join(5)
        theirs.close()


@ssh.command("authorize")
@click.argument("keyfile", type=click.Path(dir_okay=False))
def authorize_cmd(keyfile: str) -> None:
    """Allow the public key in KEYFILE to log in to every sandbox of this $MICROVM_HOME.

    Example: microvm ssh authorize ~/.ssh/id_ed25519.pub
    """
    from microvm.ssh._keys import authorize, authorized_keys_path
    from microvm.ssh.errors import SshConfigError

    try:
        added = authorize(keyfile)
    except SshConfigError as e:
        raise click.BadParameter(str(e), param_hint="KEYFILE") from None
    click.echo(f"{'added to' if added else 'already in'} {authorized_keys_path()}")


def ssh_config_block(name: str) -> str:
    """The ``Host NAME`` block for ``~/.ssh/config`` (ProxyCommand ``microvm ssh serve
    NAME --stdio``, the host key pinned through ``$MICROVM_HOME/ssh/known_hosts``).

    Example::

        print(ssh_config_block("demo"))
    """
    from microvm.ssh._keys import HOST_KEY_ALIAS, host_key, write_known_hosts
    from rootfs import microvm_home

    known = write_known_hosts(host_key())
    cmd = " ".join(shlex.quote(a) for a in (
        "env", f"MICROVM_HOME={microvm_home()}", sys.executable, "-m", "microvm", "ssh",
        "serve", name, "--stdio")).replace("%", "%%")
    return (f"Host {name}\n"
            f"    User root\n"
            f"    ProxyCommand {cmd}\n"
            f"    HostKeyAlias {HOST_KEY_ALIAS}\n"
            f"    UserKnownHostsFile \"{known}\"\n"
            f"    StrictHostKeyChecking yes\n"
            f"    PasswordAuthentication no\n"
            f"    KbdInteractiveAuthentication no\n")


@ssh.command("config")
@click.argument("name")
def config_cmd(name: str) -> None:
    """Print a Host block for ~/.ssh/config that reaches sandbox NAME (ssh, sftp, scp,
    rsync -e ssh).

    Example: microvm ssh config demo >> ~/.ssh/config
    """
    _check_sandbox(name)
    click.echo(ssh_config_block(name), nl=False)


@ssh.command("connect", context_settings={"ignore_unknown_options": True,
                                          "allow_interspersed_args": False})
@click.option("-t/-T", "tty", default=None, help="force / refuse a terminal")
@click.argument("name")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
def connect_cmd(name: str, cmd: tuple[str, ...], tty: bool | None) -> None:
    """Open a shell in sandbox NAME, or run CMD there (in-process client; `microvm ssh
    NAME [CMD]` is the short form). Exits with the remote status.

    Example: microvm ssh demo uname -a
    """
    _check_sandbox(name)
    from microvm.ssh._client import connect

    client = connect(name)
    try:
        code = _session(client, " ".join(cmd) if cmd else None, tty)
    finally:
        client.close()
    sys.exit(code)


def _session(client: SshClient, command: str | None, tty: bool | None) -> int:
    import termios
    import tty as tty_mod

    interactive = os.isatty(0) and os.isatty(1)
    want_tty = tty if tty is not None else (command is None and interactive)
    chan = client._transport_or_fail().open_session()
    saved = None
    on_winch = None
    if want_tty:
        size = os.get_terminal_size(1) if os.isatty(1) else os.terminal_size((80, 24))
        chan.get_pty(term=os.environ.get("TERM", "xterm"), width=size.columns,
                     height=size.lines)
        if os.isatty(0):
            saved = termios.tcgetattr(0)
            tty_mod.setraw(0)

            def on_winch(signum: int, frame: Any) -> None:
                with contextlib.suppress(Exception):
                    s = os.get_terminal_size(1)
                    chan.resize_pty(width=s.columns, height=s.lines)

            signal.signal(signal.SIGWINCH, on_winch)
    try:
        if command is None:
            chan.invoke_shell()
        else:
            chan.exec_command(command)
        return _pump(chan)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if on_winch is not None:
            signal.signal(signal.SIGWINCH, signal.SIG_DFL)


def _pump(chan: paramiko.Channel) -> int:
    def stdin_to_chan() -> None:
        with contextlib.suppress(Exception):
            while data := os.read(0, 1 << 16):
                chan.sendall(data)
        with contextlib.suppress(Exception):
            chan.shutdown_write()

    def stderr_out() -> None:
        with contextlib.suppress(Exception):
            while data := chan.recv_stderr(1 << 16):
                _write_all(2, data)

    threading.Thread(target=stdin_to_chan, daemon=True).start()
    err = threading.Thread(target=stderr_out, daemon=True)
    err.start()
    while data := chan.recv(1 << 16):
        _write_all(1, data)
    err.join(5)
    status: int = chan.recv_exit_status()
    return status
