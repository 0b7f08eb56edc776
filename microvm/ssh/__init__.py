"""microvm.ssh: SSH into sandboxes with paramiko, no sshd in the guest.

Module map (one job each):

* :mod:`~microvm.ssh._server`: :class:`SshServer` (exec, pty shells, env, signals,
  scp through exec, direct-tcpip checked against the ingress policy, idle timeout);
* :mod:`~microvm.ssh._sftp`: the ``sftp`` subsystem on the agent's streamed fs ops;
* :mod:`~microvm.ssh._client`: :class:`SshClient` / :func:`connect`, the in-process
  client over a socket pair (``Sandbox.ssh()``);
* :mod:`~microvm.ssh._keys`: host key, authorized_keys, known_hosts under
  ``$MICROVM_HOME/ssh/``;
* :mod:`~microvm.ssh._cli`: ``microvm ssh serve|authorize|config|NAME [CMD]``;
* :mod:`~microvm.ssh.errors`: :class:`SshError`, :class:`SshConfigError`.

Example::

    from microvm import Sandbox
    with Sandbox.get("demo").ssh() as ssh:
        print(ssh.exec("echo hi"))            # (0, b'hi\\n', b'')
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microvm.ssh._client import SshClient, connect
    from microvm.ssh._keys import authorize, host_key, read_public_key
    from microvm.ssh._server import SshServer
    from microvm.ssh.errors import SshConfigError, SshError

_WHERE = {
    "SshClient": "_client", "connect": "_client", "SshConfigError": "errors",
    "SshError": "errors", "authorize": "_keys", "host_key": "_keys",
    "read_public_key": "_keys", "SshServer": "_server",
}


def __getattr__(name: str) -> Any:
    """Lazy exports: ``import microvm.ssh._cli`` (the ``microvm`` command) must not pay
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
