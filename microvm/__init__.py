"""microvm: boot microVMs (QEMU microvm or libkrun) and run commands in them.

Wires ``rootfs``, ``netstack`` and ``tls_proxy`` together.

Example::

    from microvm import Sandbox
    with Sandbox.create("demo", image="busybox:1.36", network="none") as sb:
        print(sb.shell("echo hi").stdout_text)

    from microvm import Machine                  # the low-level VM API
    with Machine("qemu", disks=[Path("root.img")]) as m:
        print(m.agent.exec("/bin/echo", ["hi"]).stdout)
"""

from typing import TYPE_CHECKING

from microvm.errors import (
    AgentError,
    BackendUnavailable,
    BootError,
    ExecTimeout,
    KernelError,
    MicrovmError,
    NoUplinkError,
    SandboxConfigError,
    SandboxError,
    SandboxExists,
    SandboxNotFound,
    SandboxNotRunning,
    SnapshotError,
)
from microvm.machine import Machine
from microvm.pool import Pool

# ``Sandbox`` pulls in netstack, tls_proxy and rootfs: imported on first use (type checkers
# see the real classes, not the ``object`` that ``__getattr__`` is declared to return)
if TYPE_CHECKING:
    from microvm.sandbox import (
        AsyncSandbox,
        DnsOptions,
        ExecOutput,
        Sandbox,
        SandboxInfo,
        TlsOptions,
    )

_LAZY = {"Sandbox", "AsyncSandbox", "ExecOutput", "SandboxInfo", "DnsOptions", "TlsOptions"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import microvm.sandbox as _sb

        return getattr(_sb, name)
    raise AttributeError(f"module 'microvm' has no attribute {name!r}")


__all__ = [
    "AgentError",
    "AsyncSandbox",
    "BackendUnavailable",
    "BootError",
    "DnsOptions",
    "ExecOutput",
    "ExecTimeout",
    "KernelError",
    "Machine",
    "MicrovmError",
    "NoUplinkError",
    "Pool",
    "Sandbox",
    "SandboxConfigError",
    "SandboxError",
    "SandboxExists",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxNotRunning",
    "SnapshotError",
    "TlsOptions",
]
