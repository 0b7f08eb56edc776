"""microvm.kernel: pinned fetch, payload extraction via cffi, the PVH ELF QEMU boots."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from microvm.errors import KernelError
from microvm.kernel import (
    DEBIAN_PIN,
    WHEEL_PIN,
    Kernel,
    KernelPayload,
    fetch_kernel,
    find_xen_note,
    load_payload,
    pvh_elf_bytes,
)
from microvm.kernel._fetch import _install_lib


def _note(value: int) -> bytes:
    return struct.pack("<III", 4, 8, 18) + b"Xen\x00" + struct.pack("<Q", value)


def test_pvh_elf_layout_synthetic() -> None:
    data = b"\x90" * 100 + struct.pack("<III", 4, 8, 17) + b"Xen\x00" + bytes(8) + _note(0x1000000)
    data += b"\xcc" * 5000
    elf = pvh_elf_bytes(KernelPayload(0x1000000, 0x1000123, data, 5))
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # ELF64
    (e_type, e_machine, _v, e_entry, e_phoff) = struct.unpack_from("<HHIQQ", elf, 16)
    assert (e_type, e_machine, e_entry) == (2, 62, 0x1000123)
    phnum = struct.unpack_from("<H", elf, 56)[0]
    assert phnum == 2
    load = struct.unpack_from("<IIQQQQQQ", elf, e_phoff)
    note = struct.unpack_from("<IIQQQQQQ", elf, e_phoff + 56)
    assert load[0] == 1 and load[4] == 0x1000000 and load[5] == len(data)
    assert elf[load[2] : load[2] + load[5]] == data
    assert note[0] == 4
    n = elf[note[2] : note[2] + note[5]]
    assert n == _note(0x1000000)  # the type-18 note, not the type-17 decoy


def test_find_xen_note_missing_is_typed_error() -> None:
    with pytest.raises(KernelError, match="PHYS32_ENTRY"):
        find_xen_note(b"\x00" * 4096 + b"Xen\x00")


def test_load_payload_rejects_non_library(tmp_path: Path) -> None:
    bogus = tmp_path / "libkrunfw.so.5"
    bogus.write_bytes(b"not an elf")
    with pytest.raises(KernelError, match="cannot load libkrunfw"):
        load_payload(bogus)


def test_load_payload_rejects_library_without_symbol() -> None:
    with pytest.raises(KernelError, match="krunfw_get_kernel"):
        load_payload(Path("libc.so.6"))


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "lib.so"
    src.write_bytes(b"tampered")
    with pytest.raises(KernelError, match="sha256 mismatch"):
        _install_lib(src, DEBIAN_PIN.lib_sha256, tmp_path / "dest")
    assert not (tmp_path / "dest" / "libkrunfw.so.5").exists()


def test_pins_are_sha256_hex() -> None:
    for h in (
        DEBIAN_PIN.deb_sha256,
        DEBIAN_PIN.lib_sha256,
        WHEEL_PIN.wheel_sha256,
        WHEEL_PIN.lib_sha256,
    ):
        assert len(h) == 64 and int(h, 16) >= 0


def test_bad_source_named() -> None:
    with pytest.raises(KernelError, match="'floppy'"):
        fetch_kernel(Path("/nonexistent"), source="floppy")


def test_real_kernel_payload_and_elf(kernel: Kernel) -> None:
    meta = json.loads((kernel.elf.parent / "kernel.json").read_text())
    lib = Path(meta["library"])
    if meta["source"] == "debian":
        assert meta["library_sha256"] == DEBIAN_PIN.lib_sha256
    p = load_payload(lib)
    assert (p.load_addr, p.entry_addr, p.version) == (0x1000000, 0x1000123, 5)
    assert struct.unpack_from("<Q", find_xen_note(p.data), 16)[0] == 0x1000000
    elf = pvh_elf_bytes(p)
    assert hashlib.sha256(elf).hexdigest() == meta["elf_sha256"]
    assert kernel.elf.read_bytes() == elf


def test_fetch_into_fresh_dir_from_system_or_existing(
    kernel: Kernel, tmp_path: Path, monkeypatch
) -> None:
    """Re-extracting from an already verified library (as a 'system' libkrunfw) gives the same ELF."""
    monkeypatch.setenv("MICROVM_LIBKRUNFW", str(kernel.library))
    k = fetch_kernel(tmp_path / "k", source="system")
    assert k.source == "system"
    assert k.elf.read_bytes() == kernel.elf.read_bytes()
    again = fetch_kernel(tmp_path / "k", source="system")  # cached: no rework
    assert again.elf == k.elf
    # a corrupted cached ELF is noticed and rebuilt from the library
    with k.elf.open("r+b") as f:
        f.seek(5000)
        f.write(b"\xff\xff")
    fixed = fetch_kernel(tmp_path / "k", source="system")
    assert fixed.elf.read_bytes() == kernel.elf.read_bytes()


def test_module_cli_path(kernel: Kernel) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "microvm.kernel", "path"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("krunfw.elf")


def _fake_libkrunfw_deb(repo: Path, tmp: Path) -> None:
    pkg = tmp / "pkg"
    lib = pkg / DEBIAN_PIN.member
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not the real libkrunfw")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: {DEBIAN_PIN.package}\nVersion: {DEBIAN_PIN.version}\nArchitecture: amd64\n"
        "Maintainer: test <t@example.invalid>\nDescription: fake\n"
    )
    repo.mkdir()
    subprocess.run(["dpkg-deb", "-b", str(pkg), str(repo / "libkrunfw5_fake.deb")], check=True,
                   capture_output=True)  # fmt: skip
    pk = subprocess.run(["dpkg-scanpackages", "-m", "."], cwd=repo, check=True, capture_output=True)
    (repo / "Packages").write_bytes(pk.stdout)


def test_debian_fetch_refuses_tampered_package(tmp_path: Path, monkeypatch) -> None:
    """The whole apt pipeline (private state dir, download, verify) against a local repo."""
    from tests.support import require_binaries

    require_binaries("apt-get", "dpkg-deb", "dpkg-scanpackages")
    repo = tmp_path / "repo"
    _fake_libkrunfw_deb(repo, tmp_path)
    monkeypatch.setenv("MICROVM_DEBIAN_SOURCE", f"deb [trusted=yes] file:{repo} ./")
    with pytest.raises(KernelError, match=r"sha256 mismatch for libkrunfw5_5\.5\.0"):
        fetch_kernel(tmp_path / "dest", source="debian")
    assert not (tmp_path / "dest" / "krunfw.elf").exists()


def test_wheel_fetch_refuses_tampered_wheel(tmp_path: Path, monkeypatch) -> None:
    import zipfile

    links = tmp_path / "links"
    links.mkdir()
    whl = links / "microsandbox-0.7.11-cp310-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(WHEEL_PIN.member, b"fake")
        z.writestr("microsandbox-0.7.11.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: microsandbox\nVersion: 0.7.11\n")  # fmt: skip
        z.writestr("microsandbox-0.7.11.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp310-abi3-manylinux_2_28_x86_64\n")  # fmt: skip
        z.writestr("microsandbox-0.7.11.dist-info/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(KernelError, match=r"sha256 mismatch for microsandbox-0\.7\.11"):
        fetch_kernel(tmp_path / "dest", source="wheel")


def test_cli_kernel_fetch_and_path(kernel: Kernel, tmp_path: Path) -> None:
    import os

    env = {**os.environ, "MICROVM_LIBKRUNFW": str(kernel.library)}
    r = subprocess.run(
        [sys.executable, "-m", "microvm.cli", "kernel", "fetch", "--dest", str(tmp_path / "k"),
         "--source", "system"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k" / "krunfw.elf").read_bytes() == kernel.elf.read_bytes()
    env["MICROVM_KERNEL"] = str(tmp_path / "k" / "krunfw.elf")
    r = subprocess.run([sys.executable, "-m", "microvm.cli", "kernel", "path"], capture_output=True,
                       text=True, env=env)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == env["MICROVM_KERNEL"]
    env["MICROVM_LIBKRUNFW"] = str(tmp_path / "missing.so")
    r = subprocess.run(
        [sys.executable, "-m", "microvm.cli", "kernel", "fetch", "--dest", str(tmp_path / "k2"),
         "--source", "system"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "no system libkrunfw" in r.stderr
