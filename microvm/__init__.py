"""microvm: boot microVMs (QEMU microvm or libkrun) and run commands in them.

Wires ``rootfs``, ``netstack`` and ``tls_proxy`` together.
"""

from microvm.errors import MicrovmError

__all__ = ["MicrovmError"]
