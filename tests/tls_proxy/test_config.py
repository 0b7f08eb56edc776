"""``ProxyConfig`` refuses wrong types and values at construction with a one-line
:class:`~tls_proxy.ConfigError` naming the field (before, ``ca=None`` was accepted and
every connection failed later)."""

from __future__ import annotations

from typing import Any

import pytest

from tls_proxy import CertificateAuthority, ConfigError, ProxyConfig, Secret, TlsProxyError

CA = CertificateAuthority.generate()
S = Secret("K", "v", ["a.example"])

BAD: list[tuple[dict[str, Any], str]] = [
    (dict(ca=None), "ProxyConfig.ca must be a CertificateAuthority"),
    (dict(ca="/tmp/ca"), "ProxyConfig.ca must be a CertificateAuthority"),
    (dict(secrets=S), "ProxyConfig.secrets must be a list"),
    (dict(secrets=["K=v@a.example"]), "ProxyConfig.secrets must hold Secret objects"),
    (dict(secrets=[S, Secret("K", "w", ["b.example"])]), "duplicate secret env names"),
    (dict(bypass="bank.example"), "ProxyConfig.bypass must be a list"),
    (dict(bypass=[5]), "ProxyConfig.bypass must hold host patterns"),
    (dict(bypass=["exa mple"]), "invalid host pattern"),
    (dict(no_verify=[None]), "ProxyConfig.no_verify must hold host patterns"),
    (dict(upstream_ca_files="/etc/ssl/ca.pem"), "ProxyConfig.upstream_ca_files must be a list"),
    (dict(upstream_ca_files=[3]), "ProxyConfig.upstream_ca_files must hold file paths"),
    (dict(scoped_upstream_ca=["x"]), "ProxyConfig.scoped_upstream_ca must be a mapping"),
    (dict(resolve={"a.example": 5}), "ProxyConfig.resolve must map host names"),
    (dict(resolve={"a.example": "not-an-ip"}), "invalid --resolve address 'not-an-ip'"),
    (dict(hello_parser=None), "ProxyConfig.hello_parser must be callable"),
    (dict(handshake_timeout=0), "ProxyConfig.handshake_timeout must be a finite number"),
    (dict(idle_timeout=float("inf")), "ProxyConfig.idle_timeout must be a finite number"),
    (dict(header_timeout="30"), "ProxyConfig.header_timeout must be a finite number"),
    (dict(connect_timeout=True), "ProxyConfig.connect_timeout must be a finite number"),
    (dict(max_body_buffer=0), "ProxyConfig.max_body_buffer must be an integer >= 1"),
    (dict(max_connections=1.5), "ProxyConfig.max_connections must be an integer >= 1"),
    (dict(max_connect_head=False), "ProxyConfig.max_connect_head must be an integer >= 1"),
    (dict(http2="yes"), "ProxyConfig.http2 must be True or False"),
    (dict(verify_upstream=None), "ProxyConfig.verify_upstream must be True or False"),
    (dict(enforce_authority=1), "ProxyConfig.enforce_authority must be True or False"),
]


@pytest.mark.parametrize("kw,needle", BAD, ids=[f"{next(iter(k))}-{i}" for i, (k, _) in
                                                enumerate(BAD)])
def test_bad_config_refused_at_construction(kw: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {"ca": CA, **kw}
    with pytest.raises(ConfigError) as ei:
        ProxyConfig(**args)
    assert isinstance(ei.value, TlsProxyError)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg, msg


def test_good_config_accepted(tmp_path: Any) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_bytes(CA.ca_pem)
    cfg = ProxyConfig(ca=CA, secrets=(S,), bypass=("*.bank.example",), no_verify=[],
                      upstream_ca_files=[pem], scoped_upstream_ca={"*.corp.example": str(pem)},
                      resolve={"a.example": "192.0.2.1"}, handshake_timeout=1, idle_timeout=0.5,
                      max_connections=1)
    assert cfg.secrets == (S,)
