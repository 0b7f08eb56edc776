"""Machine snapshots: guest RAM, device state and writable disks, with a checked manifest.

How it works (QEMU; measured in ``../shared/DESIGN.md``, "Snapshots"). A snapshottable
:class:`~microvm.Machine` keeps guest RAM in a ``memfd`` that QEMU maps shared
(``memory-backend-file,mem-path=/proc/<pid>/fd/<n>,share=on``): shmem like the memfd QEMU
uses under TCG anyway (no huge pages, nothing written back to a disk), and no file in
``/dev/shm`` to leak when a process is SIGKILLed. ``snapshot(path)``:

1. QMP ``stop`` (QEMU drains and flushes the disks), ``x-ignore-shared`` and
   ``migrate fd:`` to ``path/state``: the device state only (~140 KB), RAM is not copied;
2. a sparse copy of the RAM (``path/memory``, only the pages the guest touched) and of
   every writable disk (``path/diskN.img``); the image's read-only disks are named by
   path and pinned by sha256, never copied;
3. ``cont``: the source pauses only for the copies; the checksums are computed after;
4. ``manifest.json``: format, creation time, kernel sha256, accelerator, machine config,
   every file's size and sha256, caller data (``extra``), and a checksum over it all.

``restore(path)`` starts a new QEMU with ``path/memory`` mapped **private**
(``share=off``: copy on write; every restore of one snapshot shares its unchanged pages
through the page cache) and ``-incoming defer``, fed ``path/state``; it runs again in
tens of milliseconds, its own copy of each writable disk beside it. The snapshot's files
are never written, and a file a running VM still writes is never mapped by another VM
(a private mapping shows later writes to pages it has not touched yet). A restored
machine's RAM is that private mapping, so snapshotting *it* streams its RAM into
``state`` (``memory: "stream"``); its restores then get a fresh memfd that the stream
fills (slower, still no boot).

A restore is refused with one :class:`~microvm.errors.SnapshotError` naming the problem
when the manifest is not valid JSON or its checksum does not match, a file is missing or
has the wrong size (a truncated memory file), the device state's sha256 differs, or the
kernel, accelerator or a read-only disk is not the one the snapshot was taken with.
:func:`verify` with ``full=True`` also hashes memory and disks (done on import).

Example::

    from microvm import Machine
    m = Machine(disks=[Disk(img)]).start()
    m.agent.exec("/bin/sh", ["-c", "echo hi > /tmp/x"])
    m.snapshot(Path("snap"))
    a = Machine.restore(Path("snap"))
    b = Machine.restore(Path("snap"))       # a and b carry on independently
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from microvm.errors import SnapshotError

__all__ = ["FORMAT", "Manifest", "file_sha256", "load_manifest", "memfd_for", "sparse_copy",
           "verify"]

#: manifest ``format`` of machine snapshots written by this module
FORMAT = "microvm-snapshot/1"
MANIFEST = "manifest.json"
_MEMO: dict[tuple[str, int, int, int], str] = {}

Manifest = dict[str, Any]


def data_extents(fd: int) -> Iterator[tuple[int, int]]:
    """The data extents ``(offset, length)`` of the open file ``fd``, in order
    (``SEEK_DATA``/``SEEK_HOLE``): what a sparse copy, digest or archive reads.

    Example::

        fd = os.open("upper.ext4", os.O_RDONLY)
        print(sum(n for _, n in data_extents(fd)), "bytes of data")
    """
    size, off = os.fstat(fd).st_size, 0
    while off < size:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:   # ENXIO: only a hole remains
            return
        end = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, end - data
        off = end


def sparse_copy(src: Path | int, dst: Path) -> int:
    """Copy ``src`` (a path or an open fd) to a new file ``dst``, holes kept as holes
    (``SEEK_DATA``/``SEEK_HOLE`` + ``copy_file_range``); returns the bytes of data copied.

    Example::

        sparse_copy(Path("upper.ext4"), Path("snap/disk1.img"))
    """
    own = not isinstance(src, int)
    fi = os.open(src, os.O_RDONLY | os.O_CLOEXEC) if not isinstance(src, int) else src
    try:
        size = os.fstat(fi).st_size
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        copied = 0
        try:
            os.ftruncate(fo, size)
            for data, length in data_extents(fi):
                pos, end = data, data + length
                while pos < end:
                    n = _copy_range(fi, fo, min(end - pos, 1 << 30), pos)
                    if n <= 0:
                        raise SnapshotError(f"copying {src!r} to {str(dst)!r} stopped at {pos}")
                    pos += n
                copied += length
        finally:
            os.close(fo)
        return copied
    finally:
        if own:
            os.close(fi)


_NO_CFR: set[tuple[int, int]] = set()


def _copy_range(fi: int, fo: int, n: int, pos: int) -> int:
    """copy_file_range where the kernel can (same filesystem), else sendfile."""
    devs = (os.fstat(fi).st_dev, os.fstat(fo).st_dev)
    if devs not in _NO_CFR:
        try:
            return os.copy_file_range(fi, fo, n, pos, pos)
        except OSError as e:
            if e.errno not in (18, 22, 95):  # EXDEV, EINVAL, EOPNOTSUPP
                raise
            _NO_CFR.add(devs)
    os.lseek(fo, pos, os.SEEK_SET)
    return os.sendfile(fo, fi, pos, n)


_BLOCK = 1 << 20
_ZERO = bytes(_BLOCK)


def _sparse_digest(path: Path) -> str:
    """sha256 over the size and every non-zero 1 MiB block (its index, then its bytes):
    the same for a file whatever its holes, without reading them (a 4 GiB upper disk
    holding 20 MiB of data costs 20 MiB of reads)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        h.update(size.to_bytes(8, "little"))
        done = -1
        for data, length in data_extents(fd):
            end = data + length
            for idx in range(max(data // _BLOCK, done + 1), (end - 1) // _BLOCK + 1):
                block = os.pread(fd, _BLOCK, idx * _BLOCK)
                done = idx
                if block != _ZERO[:len(block)]:
                    h.update(idx.to_bytes(8, "little"))
                    h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def file_sha256(path: Path, *, cache: bool = False) -> str:
    """Content digest of a file, hex: sha256 over its size and its non-zero 1 MiB blocks
    (index + bytes), so holes are never read and sparseness does not change it. ``cache``: remembered per (path,
    inode, size, mtime) in this process and in ``$MICROVM_HOME/cache/sha256.json``
    (kernels and image disks, hashed at every restore otherwise).

    Example::

        file_sha256(Path("vendor/krunfw.elf"), cache=True)
    """
    st = path.stat()
    key = ("nz1m:" + str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if cache:
        if key in _MEMO:
            return _MEMO[key]
        store = _cache_file()
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            disk = json.loads(store.read_text())
            if disk.get("|".join(map(str, key))):
                _MEMO[key] = str(disk["|".join(map(str, key))])
                return _MEMO[key]
    digest = _sparse_digest(path)
    if cache:
        _MEMO[key] = digest
        with contextlib.suppress(OSError, ValueError):
            from rootfs import atomic_write

            store = _cache_file()
            try:
                disk = json.loads(store.read_text())
            except (OSError, ValueError):
                disk = {}
            if len(disk) > 256:
                disk = {}
            disk["|".join(map(str, key))] = digest
            atomic_write(store, json.dumps(disk).encode())
    return digest


def _cache_file() -> Path:
    from rootfs import microvm_home

    return microvm_home() / "cache" / "sha256.json"


def memfd_for(memory_mib: int) -> tuple[int, Path]:
    """A memfd sized for ``memory_mib`` of guest RAM and the path QEMU opens it by.

    Example::

        fd, path = memfd_for(256)      # path: /proc/<pid>/fd/<fd>
    """
    fd = os.memfd_create("microvm-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, memory_mib << 20)
    except OSError:
        os.close(fd)
        raise
    return fd, Path(f"/proc/{os.getpid()}/fd/{fd}")


def _checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def seal(manifest: Manifest) -> Manifest:
    """Add the ``checksum`` over everything else in ``manifest``.

    Example::

        write_manifest(path, seal({"format": FORMAT, ...}))
    """
    out = dict(manifest)
    out["checksum"] = _checksum(out)
    return out


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Seal ``manifest`` and write it as ``path/manifest.json`` (read-only).

    Example::

        write_manifest(Path("snap"), {"format": FORMAT})
    """
    from rootfs import atomic_write

    atomic_write(path / MANIFEST, json.dumps(seal(manifest), indent=1).encode(), mode=0o400)


def load_manifest(path: Path) -> Manifest:
    """Read and check ``path/manifest.json`` (format, checksum, the files it lists: present,
    right size; the device state's sha256). A disk-only snapshot (``kind: "disk"``: an
    upper disk and the image it sits on, no memory or device state) has no ``state``.
    Raises :class:`SnapshotError`.

    Example::

        m = load_manifest(Path("snap")); print(m["created"])
    """
    name = str(path)
    if not path.is_dir():
        raise SnapshotError(f"snapshot {name!r} does not exist (no such directory)")
    try:
        manifest: Manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {name!r} has no {MANIFEST}") from None
    except (OSError, ValueError) as e:
        raise SnapshotError(f"snapshot {name!r}: {MANIFEST} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise SnapshotError(f"snapshot {name!r}: format {got!r} is not {FORMAT!r}")
    if manifest.get("checksum") != _checksum(manifest):
        raise SnapshotError(f"snapshot {name!r}: the manifest's checksum does not match "
                            f"(corrupted or edited)")
    files = manifest.get("files")
    disk_only = manifest.get("kind") == "disk"
    if not isinstance(files, dict) or ("state" not in files and not disk_only):
        raise SnapshotError(f"snapshot {name!r}: the manifest lists no device state")
    for fname, info in files.items():
        f = path / fname
        try:
            size = f.stat().st_size
        except OSError:
            raise SnapshotError(f"snapshot {name!r}: {fname} is missing") from None
        if size != info["size"]:
            raise SnapshotError(f"snapshot {name!r}: {fname} is {size} bytes, the manifest "
                                f"says {info['size']} (truncated or replaced)")
    want = None if disk_only else files["state"]["sha256"]
    if want is not None and file_sha256(path / "state") != want:
        raise SnapshotError(f"snapshot {name!r}: the device state's sha256 does not match "
                            f"the manifest (corrupted)")
    return manifest


def verify(path: Path, *, full: bool = True) -> Manifest:
    """:func:`load_manifest`, and with ``full`` the sha256 of every file (memory, disks).

    Example::

        verify(Path("snap"))      # raises SnapshotError naming the first bad file
    """
    manifest = load_manifest(path)
    if full:
        for fname, info in manifest["files"].items():
            want = info.get("sha256")
            if want and file_sha256(path / fname) != want:
                raise SnapshotError(f"snapshot {str(path)!r}: {fname}'s sha256 does not match "
                                    f"the manifest (corrupted)")
    return manifest


def describe_files(path: Path, names: list[str], *, checksums: bool,
                   hash_state: bool = True) -> dict[str, Any]:
    """``{name: {size, sha256}}`` for files in a snapshot directory (the device state is
    hashed unless ``hash_state`` is false - a transient fork template's, whose streamed
    RAM can be hundreds of MiB -; the rest only with ``checksums``).

    Example::

        describe_files(Path("snap"), ["state", "memory"], checksums=True)
    """
    out: dict[str, Any] = {}
    for n in names:
        f = path / n
        want = checksums or (n == "state" and hash_state)
        out[n] = {"size": f.stat().st_size, "sha256": file_sha256(f) if want else None}
    return out


def check_target(path: Path) -> None:
    """A snapshot may be written to ``path``: it does not exist and its parent does.

    Raises :class:`SnapshotError` before anything is paused.

    Example::

        check_target(Path("snaps/new"))
    """
    if path.exists():
        raise SnapshotError(f"snapshot path {str(path)!r} already exists: pick a new one")
    if not path.parent.is_dir():
        raise SnapshotError(f"snapshot path {str(path)!r}: parent directory does not exist")


def new_tmp(path: Path) -> Path:
    """A fresh sibling directory to build ``path`` in (renamed into place when complete).

    Example::

        tmp = new_tmp(Path("snaps/new"))
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(mode=0o700)
    return tmp


def finish(tmp: Path, path: Path) -> None:
    """Make the files read-only and move the complete snapshot into place.

    Example::

        finish(tmp, Path("snaps/new"))
    """
    for f in tmp.iterdir():
        with contextlib.suppress(OSError):
            f.chmod(0o400)
    try:
        tmp.rename(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SnapshotError(f"snapshot path {str(path)!r}: {e}") from None


# -- machine level (Machine.snapshot / Machine.from_snapshot delegate here) -------------------
def snapshot_backend(backend: object) -> Any:
    """``backend`` as a :class:`~microvm.backends.base.SnapshotBackend`, or raise
    :class:`~microvm.errors.BackendUnavailable` ("snapshots need the QEMU backend").

    Example::

        snapshot_backend(QemuBackend()).pause(handle)
    """
    from microvm.backends.base import SnapshotBackend
    from microvm.errors import BackendUnavailable

    if not isinstance(backend, SnapshotBackend):
        name = getattr(backend, "name", type(backend).__name__)
        raise BackendUnavailable(f"backend {name!r} cannot pause or snapshot a guest: "
                                 f"snapshots need the QEMU backend")
    return backend


def _accel(backend: Any) -> str:
    """The accelerator a backend runs guests with (``kvm``/``tcg``), as manifests record it."""
    return str(backend.resolved_accel()) if hasattr(backend, "resolved_accel") else "unknown"


def _machine_fields(spec: Any, accel: str, disks: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``accel``, ``kernel`` and ``config``: what a restore must match and
    start its VMM with."""
    return {
        "accel": accel,
        "kernel": {"path": str(spec.kernel), "sha256": file_sha256(spec.kernel, cache=True)},
        "config": {"cpus": spec.cpus, "memory_mib": spec.memory_mib, "init": spec.init,
                   "cmdline_extra": spec.cmdline_extra, "mac": spec.mac,
                   "net": spec.net_socket is not None, "disks": disks},
    }


def take(machine: Any, path: Path, *, extra: Mapping[str, Any] | None = None,
         checksums: bool = True) -> Manifest:
    """Snapshot a started ``machine`` into ``path`` (see the module docstring); the
    machine runs again when this returns. Returns the manifest (``paused_s`` included).

    Example::

        take(machine, Path("snap"), extra={"note": "after setup"})
    """
    spec = machine.spec
    be = snapshot_backend(machine.backend)
    path = Path(path)
    check_target(path)
    if spec.memory_file is None:
        raise SnapshotError("this machine was started with snapshots=False: its RAM is not "
                            "in a file")
    if spec.shares:
        raise SnapshotError(f"machine with virtio-fs shares {[s.tag for s in spec.shares]} "
                            f"cannot be snapshotted (QEMU cannot migrate vhost-user-fs): "
                            f"volumes and directory roots rule snapshots out")
    handle = machine.handle
    if handle.poll() is not None:
        raise SnapshotError("the machine is not running")
    accel = _accel(be)
    stream = not spec.memory_shared
    tmp = new_tmp(path)
    try:
        t0 = time.monotonic()
        be.save_state(handle, tmp / "state", include_ram=stream)
        try:
            names = ["state"]
            if not stream:
                src = machine._memfd if machine._memfd is not None else spec.memory_file
                sparse_copy(src, tmp / "memory")
                names.append("memory")
            disks: list[dict[str, Any]] = []
            for i, d in enumerate(spec.disks):
                if d.readonly:
                    disks.append({"index": i, "readonly": True, "path": str(d.path.resolve()),
                                  "sha256": None})
                else:
                    sparse_copy(d.path, tmp / f"disk{i}.img")
                    names.append(f"disk{i}.img")
                    disks.append({"index": i, "readonly": False, "file": f"disk{i}.img"})
        finally:
            be.resume(handle)
        paused = time.monotonic() - t0
        for d in disks:
            if d["readonly"]:
                d["sha256"] = file_sha256(Path(d["path"]), cache=True)
        manifest: Manifest = {
            "format": FORMAT,
            "created": time.time(),
            "paused_s": round(paused, 4),
            "memory": "stream" if stream else "file",
            **_machine_fields(spec, accel, disks),
            "files": describe_files(tmp, names, checksums=checksums),
            "extra": dict(extra or {}),
        }
        write_manifest(tmp, manifest)
        finish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return seal(manifest)


def check_compatible(path: Path, manifest: Manifest, backend: Any, kernel: Path) -> None:
    """Refuse a restore whose kernel, accelerator or read-only disks differ from the
    snapshot's (one :class:`SnapshotError` naming the difference).

    Example::

        check_compatible(Path("snap"), load_manifest(Path("snap")), QemuBackend(), k.elf)
    """
    name = str(path)
    want = manifest["kernel"]["sha256"]
    if file_sha256(kernel, cache=True) != want:
        raise SnapshotError(f"snapshot {name!r} was taken with another kernel (sha256 "
                            f"{want[:12]}), not {str(kernel)!r}")
    accel = _accel(backend)
    if accel != manifest["accel"]:
        raise SnapshotError(f"snapshot {name!r} was taken under {manifest['accel']}, this "
                            f"backend runs {accel}: restore it with the same accelerator")
    for d in manifest["config"]["disks"]:
        if not d["readonly"]:
            continue
        p = Path(d["path"])
        if not p.is_file():
            raise SnapshotError(f"snapshot {name!r}: read-only disk {d['path']!r} is missing")
        if file_sha256(p, cache=True) != d["sha256"]:
            raise SnapshotError(f"snapshot {name!r}: read-only disk {d['path']!r} is not the "
                                f"image the snapshot was taken with (sha256 differs)")


def reconfig_payload(hostname: str | None, network: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``core.reconfigure`` a restored guest gets: fresh host entropy, the host's clock,
    and the new hostname/network when given.

    Example::

        reconfig_payload("fork-1", None)["clock"]["realtime_ns"] > 0
    """
    out: dict[str, Any] = {"entropy": os.urandom(64), "clock": {"realtime_ns": time.time_ns()}}
    if hostname is not None:
        out["hostname"] = hostname
    if network is not None:
        out["network"] = dict(network)
    return out


def freeze(machine: Any, path: Path, *, extra: Mapping[str, Any] | None = None
           ) -> tuple[Manifest, int]:
    """Freeze a running ``machine`` whose RAM is its own shared memfd into a fork template
    at ``path``, without copying RAM: QMP ``stop`` + the device state (``x-ignore-shared``),
    ``path/memory`` a symlink to ``/proc/<this pid>/fd/<a dup of the memfd>``, and the
    writable disks *moved* into ``path`` (the stopped VMM keeps them open). The machine
    stays stopped and must never run again: its caller restarts it as a copy-on-write
    child of the template (:meth:`Machine.from_snapshot` maps ``memory`` private), beside
    the forks, or undoes this with :func:`thaw`. Returns the manifest and the memfd dup
    (the template's memory: close it once every child mapped it; the kernel frees the
    pages when the last mapping goes).

    Raises :class:`SnapshotError` before stopping anything when the machine's RAM is not
    its own shared memfd (a restore or a copy-on-write child maps a file private: it can
    only be snapshotted, its RAM streamed).

    Example::

        manifest, fd = freeze(machine, Path("tpl"))
    """
    spec = machine.spec
    be = snapshot_backend(machine.backend)
    path = Path(path)
    check_target(path)
    memfd = getattr(machine, "_memfd", None)
    if spec.memory_file is None:
        raise SnapshotError("this machine was started with snapshots=False: its RAM is not "
                            "in a file")
    if not spec.memory_shared or memfd is None:
        raise SnapshotError("this machine's RAM is not its own shared memfd: it cannot be "
                            "frozen into a template (snapshot it instead)")
    if spec.shares:
        raise SnapshotError("a machine with virtio-fs shares cannot be frozen")
    handle = machine.handle
    if handle.poll() is not None:
        raise SnapshotError("the machine is not running")
    accel = _accel(be)
    tmp = new_tmp(path)
    dup = os.dup(memfd)
    moved: list[tuple[Path, Path]] = []
    try:
        t0 = time.monotonic()
        be.save_state(handle, tmp / "state", include_ram=False)
        os.symlink(f"/proc/{os.getpid()}/fd/{dup}", tmp / "memory")
        names = ["state", "memory"]
        disks: list[dict[str, Any]] = []
        for i, d in enumerate(spec.disks):
            if d.readonly:
                disks.append({"index": i, "readonly": True, "path": str(d.path.resolve()),
                              "sha256": file_sha256(d.path, cache=True)})
                continue
            dst = tmp / f"disk{i}.img"
            try:
                os.rename(d.path, dst)
                moved.append((Path(d.path), dst))
            except OSError:   # another filesystem: copy (the VMM is stopped)
                sparse_copy(d.path, dst)
            names.append(dst.name)
            disks.append({"index": i, "readonly": False, "file": dst.name})
        manifest: Manifest = {
            "format": FORMAT,
            "created": time.time(),
            "paused_s": round(time.monotonic() - t0, 4),
            "memory": "file",
            "frozen": True,
            **_machine_fields(spec, accel, disks),
            "files": describe_files(tmp, names, checksums=False, hash_state=False),
            "extra": dict(extra or {}),
        }
        write_manifest(tmp, manifest)
        tmp.rename(path)
    except BaseException:
        for orig, now in moved:
            with contextlib.suppress(OSError):
                os.rename(now, orig)
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(dup)
        with contextlib.suppress(Exception):
            be.resume(handle)
        raise
    return seal(manifest), dup


def thaw(path: Path, original_disks: list[Path]) -> None:
    """Undo :func:`freeze` when the child could not start: move the writable disks back
    (``original_disks``: the machine's writable disk paths, in order) and delete the
    template. The caller then ``cont`` s the stopped VMM.

    Example::

        thaw(Path("tpl"), [Path("upper.ext4")])
    """
    manifest = json.loads((path / MANIFEST).read_text())
    writable = [d for d in manifest["config"]["disks"] if not d["readonly"]]
    for d, orig in zip(writable, original_disks, strict=True):
        src = path / d["file"]
        if src.exists() and not orig.exists():
            os.rename(src, orig)
    shutil.rmtree(path, ignore_errors=True)
