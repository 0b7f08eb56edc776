"""microvm.ssh: SSH into sandboxes with paramiko, no sshd in the guest.

Module map (one job each):

* :mod:`~microvm.ssh.server`: :class:`SshServer` (exec, pty shells, env, signals,
  scp through exec, direct-tcpip checked against the ingress policy, idle timeout);
* :mod:`~microvm.ssh.sftp`: the ``sftp`` subsystem on the agent's streamed fs ops;
* :mod:`~microvm.ssh.client`: :class:`SshClient` / :func:`connect`, the in-process
  client over a socket pair (``Sandbox.ssh()``);
* :mod:`~microvm.ssh.keys`: host key, authorized_keys, known_hosts under
  ``$MICROVM_HOME/ssh/``;
* :mod:`~microvm.ssh.cli`: ``microvm ssh serve|authorize|config|NAME [CMD]``;
* :mod:`~microvm.ssh.errors`: :class:`SshError`, :class:`SshConfigError`.

Example::

    from microvm import Sandbox
    with Sandbox.get("demo").ssh() as ssh:
        print(ssh.exec("echo hi"))            # (0, b'hi\\n', b'')
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microvm.ssh.client import SshClient, connect
    from microvm.ssh.errors import SshConfigError, SshError
    from microvm.ssh.keys import authorize, host_key, read_public_key
    from microvm.ssh.server import SshServer

_WHERE = {
    "SshClient": "client", "connect": "client", "SshConfigError": "errors",
    "SshError": "errors", "authorize": "keys", "host_key": "keys",
    "read_public_key": "keys", "SshServer": "server",
}


def __getattr__(name: str) -> Any:
    """Lazy exports: ``import microvm.ssh.cli`` (the ``microvm`` command) must not pay
    for importing paramiko."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"microvm.ssh.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'microvm.ssh' has no attribute {name!r}")


__all__ = [
    "SshClient",
    "SshConfigError",
    "SshError",
    "SshServer",
    "authorize",
    "connect",
    "host_key",
    "read_public_key",
]
