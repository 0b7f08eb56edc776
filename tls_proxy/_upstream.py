"""Verified TLS connections to upstreams: system roots, extra CA files, per-host overrides.

Example::

    >>> from tls_proxy._upstream import UpstreamTls
    >>> up = UpstreamTls(extra_ca_files=[], scoped_ca={}, no_verify=["*.insecure.test"])
    >>> up.context_for("a.insecure.test").verify_mode.name
    'CERT_NONE'
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence

from tls_proxy._hosts import HostList, HostPattern
from tls_proxy.errors import ConfigError


class UpstreamTls:
    """Builds (and caches) the client ``SSLContext`` used toward each upstream host.

    ``extra_ca_files`` are trusted for every host in addition to the system roots;
    ``scoped_ca`` maps a host pattern to a PEM trusted only for matching hosts (the most
    specific pattern wins); ``no_verify`` patterns (or ``verify=False``) skip verification.

    Example::

        >>> UpstreamTls().context_for("api.example.com").check_hostname
        True
    """

    def __init__(
        self,
        extra_ca_files: Sequence[str | os.PathLike[str]] = (),
        scoped_ca: Mapping[str, str | os.PathLike[str]] | None = None,
        no_verify: Sequence[str] = (),
        verify: bool = True,
        alpn: Sequence[str] = ("http/1.1",),
    ) -> None:
        self.extra = [str(p) for p in extra_ca_files]
        self.scoped = {HostPattern.parse(k): str(v) for k, v in (scoped_ca or {}).items()}
        for path in [*self.extra, *self.scoped.values()]:
            if not os.path.isfile(path):
                raise ConfigError(f"upstream CA file {path!r} does not exist")
        self.no_verify = HostList(no_verify)
        self.verify = verify
        self.alpn = list(alpn)
        self._cache: dict[tuple[str | None, bool, bool], ssl.SSLContext] = {}
        if self.extra:  # fail early on a bad PEM
            self._build(None, True)

    def _build(self, scoped: str | None, verify: bool, h2: bool = False) -> ssl.SSLContext:
        key = (scoped, verify, h2)
        ctx = self._cache.get(key)
        if ctx is not None:
            return ctx
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            for path in self.extra:
                ctx.load_verify_locations(cafile=path)
            if scoped:
                ctx.load_verify_locations(cafile=scoped)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot load upstream CA file: {e}") from None
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if h2:
            ctx.set_alpn_protocols(["h2", *[p for p in self.alpn if p != "h2"]])
        elif self.alpn:
            ctx.set_alpn_protocols(self.alpn)
        self._cache[key] = ctx
        return ctx

    def context_for(self, host: str, h2: bool = False) -> ssl.SSLContext:
        """The context to use for upstream ``host`` (offering ALPN ``h2`` first if ``h2``)."""
        verify = self.verify and not self.no_verify.matches(host)
        best = None
        for pat, path in self.scoped.items():
            if pat.matches(host) and (best is None or pat.specificity() > best[0].specificity()):
                best = (pat, path)
        return self._build(best[1] if best else None, verify, h2)
