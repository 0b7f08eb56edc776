"""Exceptions raised by :mod:`tls_proxy`; all derive from :class:`TlsProxyError`.

Messages name the bad value and what is allowed, but never contain a secret value.

Example::

    >>> from tls_proxy import Secret, TlsProxyError
    >>> try:
    ...     Secret("K", "hunter2", [])
    ... except TlsProxyError as e:
    ...     print(e)
    secret K: at least one allowed host is required
"""

from __future__ import annotations


class TlsProxyError(Exception):
    """Base class of every error raised by tls_proxy.

    Example::

        >>> issubclass(ConfigError, TlsProxyError)
        True
    """


class ConfigError(TlsProxyError, ValueError):
    """A configuration value (host pattern, address, option) is invalid.

    Example::

        >>> from tls_proxy import HostPattern
        >>> HostPattern.parse("exa mple.com")
        Traceback (most recent call last):
        ...
        tls_proxy.errors.ConfigError: invalid host pattern 'exa mple.com': ...
    """


class SecretError(ConfigError):
    """A :class:`tls_proxy.Secret` was built from invalid fields (the value is never shown).

    Example::

        >>> from tls_proxy import Secret
        >>> Secret("1X", "v", ["a.example"])
        Traceback (most recent call last):
        ...
        tls_proxy.errors.SecretError: invalid secret env name '1X': must match [A-Za-z_][A-Za-z0-9_]*
    """


class CertificateError(TlsProxyError):
    """The CA could not be loaded/created or a leaf certificate could not be minted.

    Example::

        >>> from tls_proxy import CertificateAuthority
        >>> CertificateAuthority.generate().mint_leaf("")
        Traceback (most recent call last):
        ...
        tls_proxy.errors.CertificateError: cannot mint a certificate for '': bad length
    """


class ClientHelloError(TlsProxyError):
    """The first bytes of a connection are not a parseable TLS ClientHello.

    Example::

        >>> from tls_proxy import parse_client_hello
        >>> parse_client_hello(b"SSH-2.0-x\\r\\n")
        Traceback (most recent call last):
        ...
        tls_proxy.errors.ClientHelloError: not a TLS handshake: first byte 0x53 (expected 0x16)
    """


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

