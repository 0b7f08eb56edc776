"""microvm: boot microVMs (QEMU microvm or libkrun) and run commands in them.

Wires ``rootfs``, ``netstack`` and ``tls_proxy`` together.
"""

from microvm.errors import BackendUnavailable, BootError, KernelError, MicrovmError
from microvm.machine import Machine

__all__ = ["BackendUnavailable", "BootError", "KernelError", "Machine", "MicrovmError"]
