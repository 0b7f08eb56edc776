"""Exceptions raised by :mod:`tls_proxy`; all derive from :class:`TlsProxyError`.

Messages name the bad value and what is allowed, but never contain a secret value.
"""

from __future__ import annotations


class TlsProxyError(Exception):
    """Base class of every error raised by tls_proxy."""


class ConfigError(TlsProxyError, ValueError):
    """A configuration value (host pattern, address, option) is invalid.

    Example::

        >>> from tls_proxy.hosts import HostPattern
        >>> HostPattern.parse("exa mple.com")
        Traceback (most recent call last):
        ...
        tls_proxy.errors.ConfigError: invalid host pattern 'exa mple.com': ...
    """


class SecretError(ConfigError):
    """A :class:`tls_proxy.Secret` was built from invalid fields (the value is never shown)."""


class CertificateError(TlsProxyError):
    """The CA could not be loaded/created or a leaf certificate could not be minted."""


class ClientHelloError(TlsProxyError):
    """The first bytes of a connection are not a parseable TLS ClientHello."""


class HttpError(TlsProxyError):
    """A malformed or disallowed HTTP/1 message; ``status`` is the reply to send.

    Example::

        >>> HttpError(431, "header block larger than 65536 bytes").status
        431
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class UpstreamError(TlsProxyError):
    """The upstream could not be reached or its certificate failed verification."""
