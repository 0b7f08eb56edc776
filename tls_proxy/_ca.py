"""The interception CA (P-256, persisted with mode 0600) and fast, cached leaf minting.

Example::

    >>> import tempfile
    >>> from tls_proxy import CertificateAuthority
    >>> ca = CertificateAuthority.load_or_create(tempfile.mkdtemp())
    >>> ca.ca_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    True
    >>> ctx = ca.server_context("api.example.com")   # ssl.SSLContext holding [leaf, CA]
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from filelock import FileLock

from tls_proxy.errors import CertificateError

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
MAX_VALIDITY_HOURS = 24 * 397
"""The longest leaf lifetime the CA mints (browsers refuse longer ones)."""
BACKDATE = _dt.timedelta(seconds=120)
"""Leaves are valid from ``now - BACKDATE``: a guest clock a little behind still accepts them."""
RENEW_BEFORE = _dt.timedelta(minutes=5)


def default_ca_dir() -> Path:
    """``$MICROVM_HOME/tls`` (default ``~/.microvm/tls``): where the shared CA lives.

    Example::

        >>> default_ca_dir().name
        'tls'
    """
    home = os.environ.get("MICROVM_HOME") or os.path.join("~", ".microvm")
    return Path(home).expanduser() / "tls"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _san_for(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        name.encode("idna").decode("ascii")
        return x509.DNSName(name)
    except (UnicodeError, ValueError) as e:
        raise CertificateError(f"cannot mint a certificate for {name!r}: {e}") from None


@dataclass(frozen=True)
class Leaf:
    """A minted leaf: PEM of the chain ``[leaf, CA]``, PEM of its key, and its expiry.

    Example::

        >>> leaf = ca.mint_leaf("example.com")          # doctest: +SKIP
        >>> leaf.chain_pem.count(b"BEGIN CERTIFICATE")  # doctest: +SKIP
        2
    """

    certificate: x509.Certificate
    chain_pem: bytes
    key_pem: bytes
    not_after: _dt.datetime


class CertificateAuthority:
    """A CA certificate + key used to mint per-SNI leaves, with an LRU of ready SSL contexts.

    Build it with :meth:`load_or_create` (persisted) or :meth:`generate` (in memory).
    ``validity_hours`` sets each leaf's lifetime, ``cache_capacity`` the LRU size and
    ``reuse_leaf_key`` (default True, as mitmproxy does) signs every leaf over one P-256
    key made at start-up instead of a fresh key per leaf.

    Example::

        >>> ca = CertificateAuthority.generate(validity_hours=1, cache_capacity=10)
        >>> ca.mint_leaf("a.example").certificate.subject.rfc4514_string()
        'CN=a.example'
    """

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        *,
        cert_path: Path | None = None,
        validity_hours: float = 24.0,
        cache_capacity: int = 1000,
        reuse_leaf_key: bool = True,
    ) -> None:
        self._check_options(validity_hours, cache_capacity)
        self.cert = cert
        self._key = key
        self.cert_path = cert_path
        self.validity = _dt.timedelta(hours=validity_hours)
        self.cache_capacity = cache_capacity
        self.reuse_leaf_key = reuse_leaf_key
        self.ca_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1()) if reuse_leaf_key else None
        self._leaf_key_pem = self._key_pem(self._leaf_key) if self._leaf_key else b""
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski)
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], tuple[ssl.SSLContext, _dt.datetime]]
        self._cache = OrderedDict()
        self._lock = threading.Lock()
        self.minted = 0

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self.cert.subject.rfc4514_string()!r}, path={self.cert_path!s})"

    @staticmethod
    def _check_options(validity_hours: float, cache_capacity: int) -> None:
        """Refuse a leaf lifetime or cache size the CA cannot use (CertificateError)."""
        if not (0 < validity_hours <= MAX_VALIDITY_HOURS):
            raise CertificateError(
                f"invalid validity_hours {validity_hours!r}: must be in (0, {MAX_VALIDITY_HOURS}]"
            )
        if cache_capacity < 1:
            raise CertificateError(f"invalid cache_capacity {cache_capacity!r}: must be >= 1")

    @staticmethod
    def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @staticmethod
    def _new_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "microvm-sandbox"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cert, key

    @classmethod
    def generate(
        cls, common_name: str = "microvm-sandbox CA", **options: float | int | bool
    ) -> CertificateAuthority:
        """A fresh in-memory CA (nothing written); ``options`` as for the constructor."""
        cert, key = cls._new_ca(common_name)
        return cls(cert, key, **options)  # type: ignore[arg-type]

    @classmethod
    def load_or_create(
        cls,
        directory: str | os.PathLike[str],
        *,
        common_name: str = "microvm-sandbox CA",
        validity_hours: float = 24.0,
        cache_capacity: int = 1000,
        reuse_leaf_key: bool = True,
    ) -> CertificateAuthority:
        """Load ``ca.crt``/``ca.key`` from ``directory`` or create them (key mode 0600).

        Creation is atomic (temp file + rename) and guarded by a file lock, so two
        processes sharing the directory end up with the same CA. Bad ``validity_hours``
        or ``cache_capacity`` is refused (:class:`CertificateError`) before anything is
        created.

        Example::

            >>> ca = CertificateAuthority.load_or_create("/tmp/my-ca")  # doctest: +SKIP
            >>> ca.cert_path                                            # doctest: +SKIP
            PosixPath('/tmp/my-ca/ca.crt')
        """
        cls._check_options(validity_hours, cache_capacity)
        d = Path(directory).expanduser()
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            with FileLock(str(d / ".ca.lock"), timeout=30):
                cp, kp = d / CA_CERT_FILE, d / CA_KEY_FILE
                if cp.exists() != kp.exists():
                    missing = kp if cp.exists() else cp
                    raise CertificateError(
                        f"incomplete CA in {d}: {missing.name} is missing; "
                        "delete both files to regenerate"
                    )
                if not cp.exists():
                    cert, key = cls._new_ca(common_name)
                    _atomic_write(kp, cls._key_pem(key), 0o600)
                    _atomic_write(cp, cert.public_bytes(serialization.Encoding.PEM), 0o644)
                else:
                    cert = x509.load_pem_x509_certificate(cp.read_bytes())
                    loaded = serialization.load_pem_private_key(kp.read_bytes(), password=None)
                    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                        raise CertificateError(f"CA key {kp} is not an EC key")
                    key = loaded
                    pub = serialization.PublicFormat.SubjectPublicKeyInfo
                    der = serialization.Encoding.DER
                    if key.public_key().public_bytes(der, pub) != cert.public_key().public_bytes(
                        der, pub
                    ):
                        raise CertificateError(f"CA key {kp} does not match certificate {cp}")
        except CertificateError:
            raise
        except (OSError, ValueError, TypeError) as e:
            raise CertificateError(f"cannot load or create the CA in {d}: {e}") from None
        return cls(
            cert,
            key,
            cert_path=cp,
            validity_hours=validity_hours,
            cache_capacity=cache_capacity,
            reuse_leaf_key=reuse_leaf_key,
        )

    def mint_leaf(self, name: str) -> Leaf:
        """Mint (uncached) a server certificate for ``name`` (DNS name or IP address).

        SAN = the name, EKU serverAuth, not_before backdated by :data:`BACKDATE`.
        """
        if not name or len(name) > 253:
            raise CertificateError(f"cannot mint a certificate for {name!r}: bad length")
        san = _san_for(name)
        key = self._leaf_key or ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + self.validity, self.cert.not_valid_after_utc)
        cn = name if len(name) <= 64 else name[:64]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.minted += 1
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem
        key_pem = self._leaf_key_pem if self._leaf_key else self._key_pem(key)
        return Leaf(cert, chain, key_pem, not_after)

    def _context_for(self, leaf: Leaf, alpn: Sequence[str]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain only reads paths: hand it an anonymous memory file, never disk.
        fd = os.memfd_create("tls_proxy_leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, leaf.key_pem + leaf.chain_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    def server_context(self, name: str, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
        """A cached server ``SSLContext`` presenting a leaf for ``name`` and offering ``alpn``.

        Leaves are kept in an LRU of ``cache_capacity`` entries and re-minted when less
        than five minutes of validity remain.
        """
        k = (name.lower(), tuple(alpn))
        now = _now()
        with self._lock:
            hit = self._cache.get(k)
            if hit is not None and hit[1] - now > RENEW_BEFORE:
                self._cache.move_to_end(k)
                return hit[0]
        leaf = self.mint_leaf(k[0])
        ctx = self._context_for(leaf, alpn)
        with self._lock:
            self._cache[k] = (ctx, leaf.not_after)
            self._cache.move_to_end(k)
            while len(self._cache) > self.cache_capacity:
                self._cache.popitem(last=False)
        return ctx

    def cache_size(self) -> int:
        """How many ready contexts the LRU holds."""
        return len(self._cache)
