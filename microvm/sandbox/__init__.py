"""microvm.sandbox: the product that joins the layers, ``Sandbox`` / ``AsyncSandbox``.

Module map (one job each):

* :mod:`~microvm.sandbox._config`: every ``create`` argument validated into a storable
  :class:`SandboxConfig` (no secret values in it);
* :mod:`~microvm.sandbox._asandbox`: :class:`AsyncSandbox`, the async core;
  :mod:`~microvm.sandbox._sandbox`: :class:`Sandbox`, its blocking twin;
* :mod:`~microvm.sandbox._exec` / :mod:`~microvm.sandbox._fs`: exec results, streamed
  exec handles, guest files;
* :mod:`~microvm.sandbox._launch`: the creator's side of a start (image, root, spawn);
* :mod:`~microvm.sandbox._supervisor`: the per-sandbox supervisor process (VM, network,
  timers), :mod:`~microvm.sandbox._relay` (agent protocol relay) and
  :mod:`~microvm.sandbox._control` (its control socket);
* :mod:`~microvm.sandbox._netwiring`: slot, uplink, gateway and TLS proxy of one sandbox;
* :mod:`~microvm.sandbox._snapshots`: snapshots of sandboxes, restore, fork, pause,
  export and import; :mod:`~microvm.sandbox._zygote`: the warm process supervisors are
  forked from;
* :mod:`~microvm.sandbox._state`: ``$MICROVM_HOME/sandboxes.db``;
  :mod:`~microvm.sandbox._paths`: where a sandbox keeps its files.

Example::

    from microvm import Sandbox
    with Sandbox.create("demo", image="busybox:1.36", network="none") as sb:
        print(sb.shell("echo hi").stdout_text)
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microvm.sandbox._asandbox import AsyncSandbox, AsyncSandboxNetwork, SandboxInfo
    from microvm.sandbox._config import (
        DnsOptions,
        PortMapping,
        SandboxConfig,
        TlsOptions,
        Volume,
    )
    from microvm.sandbox._exec import AsyncExecHandle, ExecOutput
    from microvm.sandbox._fs import AsyncSandboxFs
    from microvm.sandbox._netwiring import SecretProxy
    from microvm.sandbox._sandbox import ExecHandle, Sandbox, SandboxFs, SandboxNetwork
    from microvm.sandbox._snapshots import (
        SnapshotInfo,
        export_snapshot,
        import_snapshot,
        list_snapshots,
        remove_snapshot,
    )

#: public name -> the submodule defining it; imported on first use, so a process that
#: needs one submodule (the supervisor starts the VMM first) does not load them all
_EXPORTS = {
    "AsyncSandbox": "_asandbox", "AsyncSandboxNetwork": "_asandbox", "SandboxInfo": "_asandbox",
    "DnsOptions": "_config", "PortMapping": "_config", "SandboxConfig": "_config",
    "TlsOptions": "_config", "Volume": "_config",
    "AsyncExecHandle": "_exec", "ExecOutput": "_exec", "AsyncSandboxFs": "_fs",
    "SecretProxy": "_netwiring",
    "ExecHandle": "_sandbox", "Sandbox": "_sandbox", "SandboxFs": "_sandbox",
    "SandboxNetwork": "_sandbox",
    "SnapshotInfo": "_snapshots", "export_snapshot": "_snapshots",
    "import_snapshot": "_snapshots", "list_snapshots": "_snapshots",
    "remove_snapshot": "_snapshots",
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
    "SnapshotInfo",
    "TlsOptions",
    "Volume",
    "export_snapshot",
    "import_snapshot",
    "list_snapshots",
    "remove_snapshot",
]
