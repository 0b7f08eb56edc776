"""netstack: a userspace network filter for microVM sandboxes.

Never imports ``rootfs``, ``tls_proxy`` or ``microvm``.
"""

from netstack.errors import NetstackError, PolicyError

__all__ = ["NetstackError", "PolicyError"]
