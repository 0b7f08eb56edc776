"""microvm.sandbox: the product that joins the layers, ``Sandbox`` / ``AsyncSandbox``.

Module map (one job each):

* :mod:`~microvm.sandbox.config`: every ``create`` argument validated into a storable
  :class:`SandboxConfig` (no secret values in it);
* :mod:`~microvm.sandbox.asandbox`: :class:`AsyncSandbox`, the async core;
  :mod:`~microvm.sandbox.sandbox`: :class:`Sandbox`, its blocking twin;
* :mod:`~microvm.sandbox.exec` / :mod:`~microvm.sandbox.fs`: exec results, streamed
  exec handles, guest files;
* :mod:`~microvm.sandbox.launch`: the creator's side of a start (image, root, spawn);
* :mod:`~microvm.sandbox.supervisor`: the per-sandbox supervisor process (VM, network,
  timers), :mod:`~microvm.sandbox.relay` (agent protocol relay) and
  :mod:`~microvm.sandbox.control` (its control socket);
* :mod:`~microvm.sandbox.netwiring`: slot, uplink, gateway and TLS proxy of one sandbox;
* :mod:`~microvm.sandbox.state`: ``$MICROVM_HOME/sandboxes.db``;
  :mod:`~microvm.sandbox.paths`: where a sandbox keeps its files.

Example::

    from microvm import Sandbox
    with Sandbox.create("demo", image="busybox:1.36", network="none") as sb:
        print(sb.shell("echo hi").stdout_text)
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microvm.sandbox.asandbox import AsyncSandbox, AsyncSandboxNetwork, SandboxInfo
    from microvm.sandbox.config import (
        DnsOptions,
        PortMapping,
        SandboxConfig,
        TlsOptions,
        Volume,
    )
    from microvm.sandbox.exec import AsyncExecHandle, ExecOutput
    from microvm.sandbox.fs import AsyncSandboxFs
    from microvm.sandbox.netwiring import SecretProxy
    from microvm.sandbox.sandbox import ExecHandle, Sandbox, SandboxFs, SandboxNetwork

#: public name -> the submodule defining it; imported on first use, so a process that
#: needs one submodule (the supervisor starts the VMM first) does not load them all
_EXPORTS = {
    "AsyncSandbox": "asandbox", "AsyncSandboxNetwork": "asandbox", "SandboxInfo": "asandbox",
    "DnsOptions": "config", "PortMapping": "config", "SandboxConfig": "config",
    "TlsOptions": "config", "Volume": "config",
    "AsyncExecHandle": "exec", "ExecOutput": "exec", "AsyncSandboxFs": "fs",
    "SecretProxy": "netwiring",
    "ExecHandle": "sandbox", "Sandbox": "sandbox", "SandboxFs": "sandbox",
    "SandboxNetwork": "sandbox",
}


def __getattr__(name: str) -> Any:
    """Import the submodule defining ``name`` on first use (PEP 562).

    Example::

        >>> import microvm.sandbox
        >>> microvm.sandbox.Sandbox.__name__
        'Sandbox'
    """
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'microvm.sandbox' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"microvm.sandbox.{mod}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AsyncExecHandle",
    "AsyncSandbox",
    "AsyncSandboxFs",
    "AsyncSandboxNetwork",
    "DnsOptions",
    "ExecHandle",
    "ExecOutput",
    "PortMapping",
    "Sandbox",
    "SandboxConfig",
    "SandboxFs",
    "SandboxInfo",
    "SandboxNetwork",
    "SecretProxy",
    "TlsOptions",
    "Volume",
]
