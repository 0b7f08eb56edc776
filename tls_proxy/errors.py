"""Exceptions raised by :mod:`tls_proxy`; all derive from :class:`TlsProxyError`."""

from __future__ import annotations


class TlsProxyError(Exception):
    """Base class of every error raised by tls_proxy."""
