"""microvm: boot microVMs (QEMU microvm or libkrun) and run commands in them.

Wires ``rootfs``, ``netstack`` and ``tls_proxy`` together.

Example::

    from microvm import Sandbox
    with Sandbox.create("demo", image="busybox:1.36", network="none") as sb:
        print(sb.shell("echo hi").stdout_text)

    from microvm import Machine, build_ext4      # the low-level VM API
    img = build_ext4(Path("rootfs"), Path("root.img"), agent=agent_binary())
    with Machine("qemu", disks=[img]) as m:
        print(m.agent.exec("/bin/echo", ["hi"]).stdout)
"""

from typing import TYPE_CHECKING

from microvm.errors import (
    AgentError,
    BackendUnavailable,
    BootError,
    DiskError,
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

# Everything but the errors is imported on first use (``Machine`` pulls in rootfs and the
# kernel module, ``Sandbox`` netstack and tls_proxy): ``import microvm`` stays cheap for
# the CLI and the supervisor. Type checkers see the real classes.
if TYPE_CHECKING:
    from microvm._guestdisk import build_ext4
    from microvm._machine import Machine
    from microvm._pool import Pool
    from microvm.sandbox import (
        AsyncSandbox,
        DnsOptions,
        ExecOutput,
        Sandbox,
        SandboxInfo,
        TlsOptions,
    )

_LAZY = {"Sandbox": "microvm.sandbox", "AsyncSandbox": "microvm.sandbox",
         "ExecOutput": "microvm.sandbox", "SandboxInfo": "microvm.sandbox",
         "DnsOptions": "microvm.sandbox", "TlsOptions": "microvm.sandbox",
         "Machine": "microvm._machine", "Pool": "microvm._pool",
         "build_ext4": "microvm._guestdisk"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'microvm' has no attribute {name!r}")


__all__ = [
    "AgentError",
    "AsyncSandbox",
    "BackendUnavailable",
    "BootError",
    "DiskError",
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
    "build_ext4",
]
