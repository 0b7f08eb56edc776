"""tls_proxy: TLS interception that injects secrets only for the hosts they belong to.

Usable alone (an explicit HTTP CONNECT proxy) or behind a gateway (transparent mode).
Never imports ``netstack``, ``rootfs`` or ``microvm``.
"""

from tls_proxy.errors import TlsProxyError

__all__ = ["TlsProxyError"]
