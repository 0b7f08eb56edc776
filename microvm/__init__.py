"""microvm: boot microVMs (QEMU microvm or libkrun) and run commands in them.

Wires ``rootfs``, ``netstack`` and ``tls_proxy`` together.

Example::

    from microvm import Machine
    with Machine("qemu", disks=[Path("root.img")]) as m:
        print(m.agent.exec("/bin/echo", ["hi"]).stdout)
"""

from microvm.errors import (
    AgentError,
    BackendUnavailable,
    BootError,
    ExecTimeout,
    KernelError,
    MicrovmError,
)
from microvm.machine import Machine

__all__ = [
    "AgentError",
    "BackendUnavailable",
    "BootError",
    "ExecTimeout",
    "KernelError",
    "Machine",
    "MicrovmError",
]
