"""Host key, authorized keys and known_hosts under ``$MICROVM_HOME/ssh/``.

* ``host_ed25519_key``: the server's ed25519 host key (OpenSSH format, 0600), created
  once, atomically (a concurrent creator's key wins; nobody sees a half-written file);
  it never enters a guest;
* ``authorized_keys``: the public keys allowed in (``microvm ssh authorize KEYFILE``);
* ``known_hosts``: one line ``microvm ssh-ed25519 ...`` for OpenSSH clients (used with
  ``HostKeyAlias microvm``, see ``microvm ssh config NAME``).

Example::

    from microvm.ssh._keys import authorize, host_key
    key = host_key()                       # created on first use
    authorize("~/.ssh/id_ed25519.pub")     # now that key may log in
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import paramiko

from microvm.ssh.errors import SshConfigError

__all__ = [
    "HOST_KEY_ALIAS",
    "authorize",
    "authorized_keys_path",
    "generate_ed25519",
    "host_key",
    "known_hosts_path",
    "load_authorized_keys",
    "read_public_key",
    "ssh_dir",
    "write_known_hosts",
]

#: the name every sandbox's host key is recorded under in ``known_hosts``
HOST_KEY_ALIAS = "microvm"


def ssh_dir() -> Path:
    """``$MICROVM_HOME/ssh`` (created 0700 on first use).

    Example::

        print(ssh_dir())      # /root/.microvm/ssh
    """
    from rootfs import microvm_home

    d = microvm_home() / "ssh"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def authorized_keys_path() -> Path:
    """``$MICROVM_HOME/ssh/authorized_keys``.

    Example::

        print(authorized_keys_path().read_text())
    """
    return ssh_dir() / "authorized_keys"


def known_hosts_path() -> Path:
    """``$MICROVM_HOME/ssh/known_hosts`` (written by :func:`write_known_hosts`).

    Example::

        print(known_hosts_path())
    """
    return ssh_dir() / "known_hosts"


def generate_ed25519() -> paramiko.Ed25519Key:
    """A fresh ed25519 key pair (paramiko cannot generate ed25519 itself).

    Example::

        key = generate_ed25519()
        print(key.get_name())      # ssh-ed25519
    """
    return paramiko.Ed25519Key.from_private_key(io.StringIO(_new_ed25519_pem()))


def _new_ed25519_pem() -> str:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()


def _atomic_create(path: Path, text: str) -> bool:
    """Create ``path`` (0600) with ``text`` unless it exists; True when we created it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)        # never replaces a key someone else created meanwhile
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _atomic_replace(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def host_key(path: str | os.PathLike[str] | None = None) -> paramiko.Ed25519Key:
    """The server's ed25519 host key at ``path`` (default
    ``$MICROVM_HOME/ssh/host_ed25519_key``), created once (0600, atomic).

    Raises :class:`SshConfigError` when the file exists but is not an unencrypted
    ed25519 private key.

    Example::

        print(host_key().get_fingerprint().hex())
    """
    p = Path(path) if path is not None else ssh_dir() / "host_ed25519_key"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _atomic_create(p, _new_ed25519_pem())
    try:
        return paramiko.Ed25519Key.from_private_key_file(str(p))
    except (paramiko.SSHException, ValueError) as e:
        raise SshConfigError(f"host key {str(p)!r} is not an unencrypted OpenSSH ed25519 "
                             f"private key: {e}") from None


def read_public_key(line: str) -> paramiko.PKey:
    """Parse one OpenSSH public key line (``type base64 [comment]``).

    Raises :class:`SshConfigError` naming the bad value (a private key, garbage, an
    unknown key type).

    Example::

        key = read_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI... me@host")
    """
    text = line.strip()
    if "PRIVATE KEY" in text:
        raise SshConfigError("that is a private key: give the public key (the .pub file)")
    parts = text.split()
    if len(parts) < 2:
        raise SshConfigError(f"bad public key {text[:60]!r}: expected 'TYPE BASE64 [comment]'")
    kind, b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(b64, validate=True)
        key = paramiko.PKey.from_type_string(kind, blob)
    except (binascii.Error, ValueError, paramiko.SSHException, paramiko.UnknownKeyType) as e:
        raise SshConfigError(f"bad public key {text[:60]!r}: {e or type(e).__name__} "
                             f"(allowed: an OpenSSH public key line such as ssh-ed25519 AAAA...)"
                             ) from None
    return key


def load_authorized_keys(path: str | os.PathLike[str] | None = None) -> list[paramiko.PKey]:
    """The keys in an authorized_keys file (default ``$MICROVM_HOME/ssh/authorized_keys``);
    a missing file means none. Options before the key type are not supported: such
    lines raise :class:`SshConfigError`.

    Example::

        print(len(load_authorized_keys()))
    """
    p = Path(path) if path is not None else authorized_keys_path()
    if not p.exists():
        return []
    keys = []
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        if raw.strip() and not raw.lstrip().startswith("#"):
            try:
                keys.append(read_public_key(raw))
            except SshConfigError as e:
                raise SshConfigError(f"{p}:{n}: {e}") from None
    return keys


def authorize(keyfile: str | os.PathLike[str], *,
              authorized_keys: str | os.PathLike[str] | None = None) -> bool:
    """Add the public key in ``keyfile`` to authorized_keys (0600); False when it was
    already there.

    Example::

        authorize("/root/.ssh/id_ed25519.pub")
    """
    src = Path(keyfile).expanduser()
    if not src.is_file():
        raise SshConfigError(f"key file {str(keyfile)!r} does not exist (give a .pub file)")
    text = src.read_text(errors="replace")
    if "PRIVATE KEY" in text:
        raise SshConfigError(f"key file {str(keyfile)!r} is a private key: give the public key "
                             f"(the .pub file)")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        raise SshConfigError(f"key file {str(keyfile)!r} must hold one public key line, "
                             f"found {len(lines)} lines")
    key = read_public_key(lines[0])
    dst = Path(authorized_keys) if authorized_keys is not None else authorized_keys_path()
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    have = load_authorized_keys(dst)
    if any(_same(k, key) for k in have):
        return False
    old = dst.read_text() if dst.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    _atomic_replace(dst, old + lines[0].strip() + "\n")
    return True


def _same(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return bool(a.get_name() == b.get_name() and a.asbytes() == b.asbytes())


def key_allowed(key: paramiko.PKey, allowed: Iterable[paramiko.PKey]) -> bool:
    """True when ``key`` is one of ``allowed`` (same type and blob).

    Example::

        assert key_allowed(k, [k])
    """
    return any(_same(key, a) for a in allowed)


def write_known_hosts(key: paramiko.PKey | None = None) -> Path:
    """Write ``$MICROVM_HOME/ssh/known_hosts`` naming the host key under
    :data:`HOST_KEY_ALIAS`; returns its path.

    Example::

        print(write_known_hosts().read_text())
    """
    k = key if key is not None else host_key()
    path = known_hosts_path()
    line = f"{HOST_KEY_ALIAS} {k.get_name()} {k.get_base64()}\n"
    if not path.exists() or path.read_text() != line:
        _atomic_replace(path, line)
    return path
