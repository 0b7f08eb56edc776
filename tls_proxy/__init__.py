"""tls_proxy: TLS interception that injects secrets only for the hosts they belong to.

Usable alone (an explicit HTTP CONNECT proxy) or behind a gateway (transparent mode).
Never imports ``netstack``, ``rootfs`` or ``microvm``.

Example::

    >>> import asyncio, tempfile
    >>> from tls_proxy import CertificateAuthority, ProxyConfig, Secret, TlsProxy
    >>> secret = Secret("OPENAI_API_KEY", "sk-real", ["api.openai.com"])
    >>> secret.guest_env()
    {'OPENAI_API_KEY': '$MSB_OPENAI_API_KEY'}
    >>> async def serve():
    ...     ca = CertificateAuthority.load_or_create(tempfile.mkdtemp())
    ...     async with TlsProxy(ProxyConfig(ca=ca, secrets=[secret])) as proxy:
    ...         host, port = await proxy.listen_explicit("127.0.0.1", 0)
    ...         return host   # clients: https_proxy=http://127.0.0.1:<port>
    >>> asyncio.run(serve())
    '127.0.0.1'
"""

from tls_proxy._ca import CertificateAuthority, Leaf, default_ca_dir
from tls_proxy._hosts import HostList, HostPattern
from tls_proxy._proxy import ProxyConfig, TlsProxy, original_dst
from tls_proxy._secrets import Secret, SecretPolicy, parse_secret_spec
from tls_proxy._sni import ClientHello, HelloLike, HelloParser, parse_client_hello
from tls_proxy.errors import (
    CertificateError,
    ClientHelloError,
    ConfigError,
    HttpError,
    SecretError,
    TlsProxyError,
)

__all__ = [
    "CertificateAuthority",
    "CertificateError",
    "ClientHello",
    "ClientHelloError",
    "ConfigError",
    "HelloLike",
    "HelloParser",
    "HostList",
    "HostPattern",
    "HttpError",
    "Leaf",
    "ProxyConfig",
    "Secret",
    "SecretError",
    "SecretPolicy",
    "TlsProxy",
    "TlsProxyError",
    "default_ca_dir",
    "original_dst",
    "parse_client_hello",
    "parse_secret_spec",
]
