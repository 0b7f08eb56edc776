"""CertificateAuthority: persistence, leaf fields, LRU cache and renewal."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tls_proxy import CertificateAuthority, CertificateError
from tls_proxy import _ca as ca_mod


def test_load_or_create_persists_with_private_key_mode(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "tls")
    key = tmp_path / "tls" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ca.cert_path == tmp_path / "tls" / "ca.crt"
    again = CertificateAuthority.load_or_create(tmp_path / "tls")
    assert again.ca_pem == ca.ca_pem
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    assert not [p for p in os.listdir(tmp_path / "tls") if p.startswith((".ca.crt", ".ca.key"))]


def _create(d: str, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    q.put(CertificateAuthority.load_or_create(d).ca_pem)


def test_two_processes_share_one_ca(tmp_path):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_create, args=(str(tmp_path), q)) for _ in range(3)]
    for p in ps:
        p.start()
    pems = {q.get(timeout=30) for _ in ps}
    for p in ps:
        p.join(10)
    assert len(pems) == 1


def test_incomplete_or_mismatched_ca_is_a_clear_error(tmp_path):
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertificateError, match=r"ca\.key is missing"):
        CertificateAuthority.load_or_create(tmp_path)
    other = tmp_path / "o"
    CertificateAuthority.load_or_create(other)
    (tmp_path / "ca.key").write_bytes((other / "ca.key").read_bytes())
    (tmp_path / "ca.crt").unlink()
    CertificateAuthority.load_or_create(tmp_path / "x")
    (tmp_path / "ca.crt").write_bytes((tmp_path / "x" / "ca.crt").read_bytes())
    with pytest.raises(CertificateError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "ca.crt").write_bytes(b"garbage")
    with pytest.raises(CertificateError, match="cannot load"):
        CertificateAuthority.load_or_create(tmp_path)


def test_leaf_fields():
    ca = CertificateAuthority.generate(validity_hours=2)
    now = dt.datetime.now(dt.UTC)
    leaf = ca.mint_leaf("api.example.com")
    c = leaf.certificate
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.com"]
    eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert c.not_valid_before_utc <= now - dt.timedelta(seconds=60)
    assert abs((c.not_valid_after_utc - now) - dt.timedelta(hours=2)) < dt.timedelta(minutes=1)
    assert c.issuer == ca.cert.subject
    assert leaf.chain_pem.count(b"BEGIN CERTIFICATE") == 2


def test_leaf_for_ip_address_and_bad_names():
    ca = CertificateAuthority.generate()
    c = ca.mint_leaf("192.0.2.7").certificate
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    for bad in ("", "a" * 300, "bad\u00ffname\udcff"):
        with pytest.raises(CertificateError):
            ca.mint_leaf(bad)


def test_shared_leaf_key_by_default_and_fresh_keys_on_request():
    ca = CertificateAuthority.generate()
    k1 = ca.mint_leaf("a.example").certificate.public_key()
    k2 = ca.mint_leaf("b.example").certificate.public_key()
    assert k1 == k2
    fresh = CertificateAuthority.generate(reuse_leaf_key=False)
    assert (fresh.mint_leaf("a.example").certificate.public_key()
            != fresh.mint_leaf("b.example").certificate.public_key())


def test_lru_cache_and_renewal(monkeypatch):
    ca = CertificateAuthority.generate(cache_capacity=2)
    c1 = ca.server_context("a.example")
    assert isinstance(c1, ssl.SSLContext)
    assert ca.server_context("a.example") is c1 and ca.minted == 1
    ca.server_context("b.example")
    ca.server_context("c.example")  # evicts a
    assert ca.cache_size() == 2
    assert ca.server_context("a.example") is not c1 and ca.minted == 4
    # near expiry -> re-minted
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=23, minutes=57)
    monkeypatch.setattr(ca_mod, "_now", lambda: later)
    ca.server_context("a.example")
    assert ca.minted == 5


def test_invalid_options():
    with pytest.raises(CertificateError, match="validity_hours"):
        CertificateAuthority.generate(validity_hours=0)
    with pytest.raises(CertificateError, match="cache_capacity"):
        CertificateAuthority.generate(cache_capacity=0)
    assert "key" not in repr(CertificateAuthority.generate()).lower()
