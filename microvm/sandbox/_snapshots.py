"""Sandbox snapshots, restore and fork (QEMU): the machinery behind ``AsyncSandbox.snapshot``,
``AsyncSandbox.restore``, ``fork``/``fork_many`` and ``pause``/``resume``.

A sandbox snapshot is a machine snapshot (:mod:`microvm._snapshot`: RAM, device state,
the writable disks, the image's read-only disks pinned by sha256) taken by the sandbox's
supervisor (control op ``snapshot``) into ``$MICROVM_HOME/snapshots/<name>``; its manifest
carries the sandbox's config and launch data (image defaults, boot environment; never
secret values) under ``extra``.

A restore is a new, independent sandbox: its own record, directory, supervisor, network
slot (gateway, addresses, MAC) and copies of the writable disks; the guest carries on from
the snapshot and is told its new identity (``core.reconfigure``: fresh host entropy and a
CRNG reseed, the host's clock, MAC/IP of its own slot, hostname). A sandbox created with
secrets needs their values again (``secrets=``), as for ``start``.

``fork`` snapshots a running sandbox into a hidden template (no checksums: it lives only
for the fork), restores it once per fork, and deletes it: each fork maps the template's
RAM privately (copy on write), and the mapping outlives the file. The source pauses only
while its RAM and disks are copied (tens of milliseconds for a small guest) and carries
on running on its own RAM; no VM ever maps a file another VM still writes.

Example::

    sb = await AsyncSandbox.create("base", image=img, network="none")
    await sb.shell("echo warm > /tmp/state")
    snap = await sb.snapshot("warm")
    a = await AsyncSandbox.restore("warm", name="a")
    forks = await sb.fork_many(3)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microvm._snapshot import data_extents, load_manifest, verify
from microvm.errors import (
    BootError,
    SandboxConfigError,
    SandboxError,
    SandboxNotFound,
    SnapshotError,
)
from microvm.sandbox import _launch
from microvm.sandbox._config import SandboxConfig, parse_secrets, validate_name
from microvm.sandbox._paths import SandboxPaths
from microvm.sandbox._state import StateDB
from tls_proxy import Secret

log = logging.getLogger("microvm.sandbox._snapshots")

if TYPE_CHECKING:
    from microvm.sandbox._asandbox import AsyncSandbox

__all__ = ["SnapshotInfo", "export_snapshot", "import_snapshot", "list_snapshots",
           "remove_snapshot", "resolve", "snapshots_root"]

SANDBOX_KIND = "sandbox"
_PARALLEL_RESTORES = 3   # fork_many: restores in flight at once
_LAUNCH_KEYS = ("root_plan", "boot_env", "image")


def snapshots_root() -> Path:
    """``$MICROVM_HOME/snapshots``.

    Example::

        >>> snapshots_root().name
        'snapshots'
    """
    from rootfs import microvm_home

    return microvm_home() / "snapshots"


def resolve(snapshot: str | os.PathLike[str]) -> Path:
    """A snapshot name (``$MICROVM_HOME/snapshots/<name>``) or a directory path.

    Example::

        >>> resolve("/tmp/snap").name
        'snap'
    """
    if isinstance(snapshot, str) and "/" not in snapshot:
        validate_name(snapshot)
        return snapshots_root() / snapshot
    if isinstance(snapshot, str | os.PathLike):
        return Path(snapshot).absolute()
    raise SnapshotError(f"bad snapshot {snapshot!r}: a name or a directory path")


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """One stored sandbox snapshot: ``name``, ``path``, ``source`` sandbox, ``created``
    (epoch seconds), ``image``, ``size`` (bytes of data on disk), ``memory_mib``.

    Example (``for s in list_snapshots(): print(s.name, s.source, s.size)``)::

        >>> [f.name for f in dataclasses.fields(SnapshotInfo)][:4]
        ['name', 'path', 'source', 'created']
    """

    name: str
    path: Path
    source: str
    created: float
    image: str
    size: int
    memory_mib: int
    #: ``"full"`` (memory, device state, disks: a restore carries on) or ``"disk"`` (the
    #: upper disk on the pinned image: a restore boots cold from it)
    kind: str = "full"

    @classmethod
    def of(cls, path: Path) -> SnapshotInfo:
        """Read (and check) the snapshot at ``path``; raises :class:`SnapshotError`.

        Example::

            SnapshotInfo.of(resolve("warm")).source
        """
        return cls._from(path, load_manifest(path))

    @classmethod
    def _from(cls, path: Path, man: dict[str, Any]) -> SnapshotInfo:
        """The info of the snapshot at ``path`` from its manifest ``man``, already loaded
        and checked (:func:`~microvm._snapshot.load_manifest`)."""
        extra = man.get("extra", {})
        if extra.get("kind") != SANDBOX_KIND:
            raise SnapshotError(f"snapshot {str(path)!r} is a machine snapshot, not a "
                                f"sandbox's (restore it with Machine.restore)")
        cfg = SandboxConfig.from_json(extra["config"])
        size = sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())
        kind = "disk" if man.get("kind") == "disk" else "full"
        memory = cfg.memory if kind == "disk" else int(man["config"]["memory_mib"])
        return cls(path.name, path, str(extra.get("source", "")), float(man["created"]),
                   cfg.image, size, memory, kind)


def list_snapshots() -> list[SnapshotInfo]:
    """Every valid snapshot under ``$MICROVM_HOME/snapshots``, oldest first.

    Example (a fresh ``MICROVM_HOME`` has none)::

        >>> list_snapshots()
        []
    """
    root = snapshots_root()
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith("."):
            continue
        with contextlib.suppress(SnapshotError, OSError, KeyError, ValueError):
            out.append(SnapshotInfo.of(p))
    return sorted(out, key=lambda s: s.created)


def remove_snapshot(snapshot: str | os.PathLike[str]) -> None:
    """Delete a snapshot (sandboxes restored from it keep running: they have their own
    disks, and their RAM mapping outlives the file).

    Example::

        >>> remove_snapshot("no-such-snapshot")
        Traceback (most recent call last):
        ...
        microvm.errors.SnapshotError: snapshot 'no-such-snapshot' does not exist
    """
    path = resolve(snapshot)
    if not (path / "manifest.json").exists():
        raise SnapshotError(f"snapshot {str(snapshot)!r} does not exist")
    shutil.rmtree(path)


def export_snapshot(snapshot: str | os.PathLike[str], archive: str | os.PathLike[str]) -> Path:
    """Write the snapshot (full or disk-only) as one ``tar`` + ``zstd`` archive, sparse
    files kept sparse: a first member ``sparse-map.json`` lists each file's size and data
    extents, and each file's member holds only its data (a 4 GiB upper disk holding 20 MiB
    costs 20 MiB). Compressed in-process with the ``zstandard`` package.

    Example (``export_snapshot("warm", "/tmp/warm.tar.zst")``; a missing one is refused)::

        >>> export_snapshot("no-such-snapshot", "out.tar.zst")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        microvm.errors.SnapshotError: snapshot '...no-such-snapshot' does not exist (no such directory)
    """
    path = resolve(snapshot)
    man = verify(path, full=False)
    out = Path(archive).absolute()
    if out.exists():
        raise SnapshotError(f"archive {str(out)!r} already exists")
    if not out.parent.is_dir():
        raise SnapshotError(f"archive {str(out)!r}: parent directory does not exist")
    import tarfile

    import zstandard

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    # the manifest and the files it lists (seals): never plugins.pickle, which a restore
    # unpickles (a pickle from an archive would run its code)
    listed = set(man["files"]) | {"manifest.json"}
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name in listed)
    smap = {f.name: {"size": f.stat().st_size, "extents": _extents(f)} for f in files}
    try:
        with open(tmp, "wb") as raw, \
                zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw) as zw, \
                tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            body = json.dumps({"format": _ARCHIVE_FORMAT, "files": smap}).encode()
            _add_member(tar, _SPARSE_MAP, len(body), io.BytesIO(body))
            for f in files:
                ext = smap[f.name]["extents"]
                assert isinstance(ext, list)
                with open(f, "rb") as fh:
                    _add_member(tar, f.name, sum(n for _, n in ext), _ExtentReader(fh, ext))
        tmp.rename(out)
    except OSError as e:
        raise SnapshotError(f"exporting {str(path)!r} to {str(out)!r}: {e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return out


_ARCHIVE_FORMAT = "microvm-snapshot-archive/1"
_SPARSE_MAP = "sparse-map.json"


def _extents(f: Path) -> list[tuple[int, int]]:
    """The data extents ``(offset, length)`` of a file (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return list(data_extents(fd))
    finally:
        os.close(fd)


class _ExtentReader(io.RawIOBase):
    """A file's data extents, read one after the other (a tar member's body)."""

    def __init__(self, fh: Any, extents: list[tuple[int, int]]) -> None:
        self._fh, self._ext, self._i, self._done = fh, extents, 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._i < len(self._ext):
            off, n = self._ext[self._i]
            if self._done < n:
                want = min(len(b), n - self._done)
                data = os.pread(self._fh.fileno(), want, off + self._done)
                if not data:
                    raise OSError(f"{self._fh.name}: shorter than its extents")
                b[:len(data)] = data
                self._done += len(data)
                return len(data)
            self._i, self._done = self._i + 1, 0
        return 0


def _add_member(tar: Any, name: str, size: int, body: Any) -> None:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o400, int(time.time())
    tar.addfile(info, io.BufferedReader(body) if isinstance(body, io.RawIOBase) else body)


def import_snapshot(archive: str | os.PathLike[str], name: str) -> SnapshotInfo:
    """Unpack an archive from :func:`export_snapshot` as snapshot ``name`` (holes restored
    as holes), verified in full (manifest checksum, every file's size and sha256) before
    it is kept. Only plain files named in the archive's sparse map are written (no paths,
    links or devices); anything else refuses the archive.

    Example (``import_snapshot("/tmp/warm.tar.zst", "warm2")``; a missing archive is refused)::

        >>> import_snapshot("no-such.tar.zst", "warm2")
        Traceback (most recent call last):
        ...
        microvm.errors.SnapshotError: archive 'no-such.tar.zst' does not exist
    """
    validate_name(name)
    src = Path(archive)
    if not src.is_file():
        raise SnapshotError(f"archive {str(archive)!r} does not exist")
    dest = snapshots_root() / name
    if dest.exists():
        raise SnapshotError(f"snapshot {name!r} already exists")
    import tarfile

    import zstandard

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.import-", dir=dest.parent))
    try:
        try:
            with open(src, "rb") as raw, \
                    zstandard.ZstdDecompressor().stream_reader(raw) as zr, \
                    tarfile.open(fileobj=zr, mode="r|") as tar:
                _unpack(tar, tmp, str(archive))
        except (tarfile.TarError, zstandard.ZstdError, ValueError, KeyError, TypeError,
                EOFError) as e:
            raise SnapshotError(f"importing {str(archive)!r}: not a snapshot archive "
                                f"({type(e).__name__}: {e})") from None
        man = verify(tmp, full=True)
        extra_files = sorted({f.name for f in tmp.iterdir()} - set(man["files"])
                             - {"manifest.json"})
        if extra_files:
            raise SnapshotError(f"importing {str(archive)!r}: files {extra_files} are not "
                                f"in the snapshot's manifest")
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SnapshotInfo._from(dest, man)


def _unpack(tar: Any, tmp: Path, archive: str) -> None:
    smap: dict[str, Any] | None = None
    for m in tar:
        if not m.isfile() or "/" in m.name or m.name in ("", ".", "..") \
                or m.name.startswith("."):
            raise SnapshotError(f"importing {archive!r}: not a snapshot archive (unexpected "
                                f"member {m.name!r}: plain file names only)")
        fh = tar.extractfile(m)
        if smap is None:
            if m.name != _SPARSE_MAP or m.size > 1 << 20:
                raise SnapshotError(f"importing {archive!r}: not a snapshot archive (no "
                                    f"{_SPARSE_MAP} first)")
            doc = json.loads(fh.read())
            if doc.get("format") != _ARCHIVE_FORMAT or not isinstance(doc.get("files"), dict):
                raise SnapshotError(f"importing {archive!r}: archive format "
                                    f"{doc.get('format')!r} is not {_ARCHIVE_FORMAT!r}")
            smap = doc["files"]
            continue
        info = smap.get(m.name)
        if info is None or (tmp / m.name).exists():
            raise SnapshotError(f"importing {archive!r}: member {m.name!r} is not in the "
                                f"sparse map (or repeated)")
        size, extents = int(info["size"]), [(int(o), int(n)) for o, n in info["extents"]]
        if sum(n for _, n in extents) != m.size or any(
                o < 0 or n <= 0 or o + n > size for o, n in extents):
            raise SnapshotError(f"importing {archive!r}: {m.name!r}'s extents do not match "
                                f"its data")
        fd = os.open(tmp / m.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            for off, n in extents:
                while n > 0:
                    chunk = fh.read(min(n, 1 << 20))
                    if not chunk:
                        raise SnapshotError(f"importing {archive!r}: {m.name!r} is truncated")
                    os.pwrite(fd, chunk, off)
                    off, n = off + len(chunk), n - len(chunk)
        finally:
            os.close(fd)
    if smap is None:
        raise SnapshotError(f"importing {archive!r}: the archive is empty")
    missing = sorted(set(smap) - {f.name for f in tmp.iterdir()})
    if missing:
        raise SnapshotError(f"importing {archive!r}: files {missing} are missing")


# -- sandbox operations --------------------------------------------------------------------
async def take(sb: AsyncSandbox, target: Path, *, checksums: bool = True) -> Path:
    """Ask ``sb``'s supervisor to snapshot its machine into ``target`` (see module doc).

    Example::

        await take(sb, snapshots_root() / "warm")
    """
    from microvm._snapshot import check_target

    target.parent.mkdir(parents=True, exist_ok=True)
    check_target(target)
    why_not = _not_snapshottable(sb)
    if why_not:
        raise SnapshotError(why_not)
    await sb._control({"op": "snapshot", "path": str(target), "extra": _extra(sb),
                       "checksums": checksums}, timeout=600.0)
    _copy_plugins(sb, target)
    return target


def _not_snapshottable(sb: AsyncSandbox) -> str | None:
    """Why ``sb`` cannot be snapshotted (virtio-fs cannot be migrated), or None."""
    if sb.config.volumes:
        return f"sandbox {sb.name!r} has volumes: virtio-fs shares cannot be snapshotted"
    if sb.config.image_kind == "dir":
        return (f"sandbox {sb.name!r} serves a directory as its root (virtio-fs): it cannot "
                f"be snapshotted")
    return None


def _extra(sb: AsyncSandbox) -> dict[str, Any]:
    """The manifest's ``extra`` of a sandbox snapshot: what a restore rebuilds it from."""
    return {"kind": SANDBOX_KIND, "source": sb.name, "config": sb.config.to_json(),
             "launch": {k: sb._launch[k] for k in _LAUNCH_KEYS if k in sb._launch}}


def _copy_plugins(sb: AsyncSandbox, target: Path) -> None:
    """The sandbox's plugins (backend, uplink: pickled) go with its snapshot."""
    plugins = sb.paths.dir / "plugins.pickle"
    if plugins.exists():
        shutil.copyfile(plugins, target / "plugins.pickle")


async def take_disk(sb: AsyncSandbox, target: Path) -> Path:
    """A disk-only snapshot of ``sb`` into ``target``: its upper disk (the writable layer
    over the image) and a manifest pinning the image's read-only disk by sha256 and the
    sandbox's config; no memory, no device state. The guest is asked to ``sync`` first,
    then paused (QEMU flushes its disk) for the copy only. A restore boots cold from it.

    Example::

        await take_disk(sb, snapshots_root() / "disk1")
    """
    from microvm._snapshot import (
        FORMAT,
        check_target,
        describe_files,
        file_sha256,
        finish,
        new_tmp,
        sparse_copy,
        write_manifest,
    )

    target.parent.mkdir(parents=True, exist_ok=True)
    check_target(target)
    plan = sb._launch.get("root_plan") or {}
    if plan.get("kind") != "overlay":
        raise SnapshotError(f"sandbox {sb.name!r} has a {plan.get('kind', 'directory')!r} "
                            f"root: disk-only snapshots need an image root (overlay)")
    upper = Path(plan["upper"]["disk"])
    lower = [{"disk": d["disk"], "fstype": d.get("fstype"),
              "sha256": await asyncio.to_thread(file_sha256, Path(d["disk"]), cache=True)}
             for d in plan["lower"]]
    status = await sb._control({"op": "status"})
    was_paused = bool(status.get("paused")) if isinstance(status, dict) else False
    if not was_paused:
        with contextlib.suppress(Exception):   # an image without sync: QEMU's flush only
            await sb.exec("sync", timeout=60)
    tmp = await asyncio.to_thread(new_tmp, target)
    try:
        if not was_paused:
            await sb._control({"op": "pause"})
        try:
            await asyncio.to_thread(sparse_copy, upper, tmp / "upper.img")
        finally:
            if not was_paused:
                await sb._control({"op": "resume"})
        manifest = {"format": FORMAT, "kind": "disk", "created": time.time(),
                    "image": {"lower": lower, "upper_fstype": plan["upper"].get("fstype")},
                    "files": await asyncio.to_thread(describe_files, tmp, ["upper.img"],
                                                     checksums=True),
                    "extra": _extra(sb)}
        await asyncio.to_thread(write_manifest, tmp, manifest)
        await asyncio.to_thread(finish, tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _disk_root_plan(path: Path, man: dict[str, Any], upper: Path) -> dict[str, Any]:
    """The cold boot's root plan from a disk-only snapshot: the pinned image disks (checked
    by sha256) under ``upper`` (the new sandbox's own copy)."""
    from microvm._snapshot import file_sha256

    plan = dict(man["extra"]["launch"]["root_plan"])
    for d in man["image"]["lower"]:
        p = Path(d["disk"])
        if not p.is_file():
            raise SnapshotError(f"snapshot {str(path)!r}: image disk {d['disk']!r} is missing "
                                f"(the image was removed: pull it again)")
        if file_sha256(p, cache=True) != d["sha256"]:
            raise SnapshotError(f"snapshot {str(path)!r}: image disk {d['disk']!r} is not the "
                                f"image the snapshot was taken with (sha256 differs)")
    plan["upper"] = {**plan["upper"], "disk": str(upper)}
    return plan


async def restore(cls: type[AsyncSandbox], snapshot: str | os.PathLike[str], *, name: str,
                  secrets: Sequence[Secret | Mapping[str, Any]] | None, detached: bool,
                  labels: Mapping[str, str] | None, boot_timeout: float) -> AsyncSandbox:
    """A new sandbox ``name`` from ``snapshot`` (see :meth:`AsyncSandbox.restore`).

    Example::

        sb = await restore(AsyncSandbox, "warm", name="a", secrets=None, detached=False,
                           labels=None, boot_timeout=120)
    """
    validate_name(name)
    if not isinstance(boot_timeout, int | float) or boot_timeout <= 0:
        raise SandboxConfigError(f"bad boot_timeout {boot_timeout!r}: seconds > 0")
    t_call = time.time()
    path = resolve(snapshot)
    man = await asyncio.to_thread(load_manifest, path)
    info = SnapshotInfo._from(path, man)
    extra = man["extra"]
    src_cfg = SandboxConfig.from_json(extra["config"])
    secret_list = parse_secrets(secrets)
    want = {s.env for s in src_cfg.secrets}
    if want != {s.env for s in secret_list}:
        raise SandboxConfigError(
            f"snapshot {info.name!r} is of a sandbox with secrets {sorted(want)}: their values "
            f"are never stored, pass them with secrets=")
    merged = dict(src_cfg.labels)
    merged.update(labels or {})
    cfg = dataclasses.replace(src_cfg, name=name, detached=detached, labels=merged)
    db = StateDB()
    paths = SandboxPaths.of(name)
    db.insert(name, config_json=cfg.to_json(), labels=cfg.labels, sandbox_dir=paths.dir)
    ok = False
    launch = dict(extra.get("launch", {}))
    launch.update({"config": cfg.to_json(), "db": str(db.path),
                   "boot_timeout": float(boot_timeout),
                   "prepared": {"record_dir": None, "upper_disk": None}})
    disk_only = info.kind == "disk"
    if not disk_only:
        launch["restore"] = {"snapshot": str(path)}
    plugins = {}
    if (path / "plugins.pickle").exists():
        import pickle

        plugins = pickle.loads((path / "plugins.pickle").read_bytes())
    try:
        for attempt in (1, 2):
            if paths.dir.exists():
                _launch.remove_files(paths, None)
            paths.dir.mkdir(parents=True, mode=0o700)
            paths.root.mkdir(mode=0o700)
            if disk_only:   # a cold boot on a copy of the snapshot's upper disk
                from microvm._snapshot import sparse_copy

                upper = paths.root / "upper.img"
                await asyncio.to_thread(sparse_copy, path / "upper.img", upper)
                launch["root_plan"] = await asyncio.to_thread(
                    _disk_root_plan, path, man, upper)
                launch["prepared"] = {"record_dir": None, "upper_disk": str(upper)}
            _launch.write_launch(paths, launch, plugins)
            try:
                t_spawn = time.time()
                report = await asyncio.to_thread(
                    _launch.spawn_supervisor, paths, name, secret_list, detached=detached,
                    timeout=float(boot_timeout) + 30)
                _record_phases(name, {"call": t_call, "spawn": t_spawn,
                                      **report.get("phases", {}), "reported": time.time()})
                break
            except BootError as e:
                # A disk-only snapshot boots cold: once more after a boot-time kernel
                # panic, as create does. (A restore whose agent hung re-addressing eth0 -
                # issue 16 - was tried once more too; the agent no longer takes eth0 down.)
                if attempt == 2 or not (disk_only and _launch.boot_panicked(e)):
                    raise
                log.warning("restore of %s as %s: %s; booting once more", info.name, name,
                            str(e).splitlines()[0])
                db.set_state(name, "created")
        ok = True
    finally:
        if not ok:
            _launch.remove_files(paths, None)
            db.delete(name)
    return cls(name, db=db)


_PHASES: dict[str, dict[str, float]] = {}


def _record_phases(name: str, stamps: dict[str, float]) -> None:
    if len(_PHASES) > 256:
        _PHASES.clear()
    _PHASES[name] = stamps


def restore_phases(name: str) -> dict[str, float]:
    """Where the last restore (or fork) named ``name`` in this process spent its time:
    seconds since the call at each step (``spawn``: the supervisor requested, ``main``:
    it runs, ``checks_start``/``vmm_start``/``agent_ready``/``serving`` in the supervisor,
    ``reported``: back in the caller). Empty when unknown.

    Example::

        restore_phases("a").get("agent_ready")
    """
    st = _PHASES.get(name, {})
    t0 = st.get("call")
    return {k: round(v - t0, 4) for k, v in st.items() if t0 is not None and k != "call"}


def _free_names(base: str, n: int, db: StateDB) -> list[str]:
    out: list[str] = []
    k = 1
    while len(out) < n:
        cand = f"{base}-fork-{k}"
        k += 1
        try:
            db.get(cand)
        except SandboxNotFound:
            out.append(cand)
    return out


async def fork_many(sb: AsyncSandbox, n: int, *, names: Sequence[str] | None,
                    secrets: Sequence[Secret | Mapping[str, Any]] | None,
                    detached: bool) -> list[AsyncSandbox]:
    """``n`` forks of a running sandbox through one hidden template (see module doc).

    Example::

        forks = await fork_many(sb, 3, names=None, secrets=None, detached=False)
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise SandboxConfigError(f"bad fork count {n!r}: an integer from 1 to 64")
    if names is not None:
        names = list(names)
        if len(names) != n or len(set(names)) != n:
            raise SandboxConfigError(f"fork names {names!r}: need {n} distinct names")
        for x in names:
            validate_name(x)
    want = {s.env for s in sb.config.secrets}
    if want != {s.env for s in parse_secrets(secrets)}:
        raise SandboxConfigError(
            f"sandbox {sb.name!r} has secrets {sorted(want)}: a fork's proxy holds its own "
            f"copy, pass their values with secrets=")
    chosen = names if names is not None else _free_names(sb.name, n, sb.db)
    template = snapshots_root() / f".fork-{sb.name}-{time.time_ns()}"
    out: list[AsyncSandbox] = []
    gate = asyncio.Semaphore(_PARALLEL_RESTORES)

    async def one(nm: str) -> AsyncSandbox:
        async with gate:
            return await restore(type(sb), template, name=nm, secrets=secrets,
                                 detached=detached, labels=None, boot_timeout=120.0)

    try:
        t0 = time.monotonic()
        await _template(sb, template)
        log.debug("fork template of %s in %.3fs", sb.name, time.monotonic() - t0)
        # the restores overlap (supervisor start, disk copies, network, QEMU)
        results = await asyncio.gather(*(one(nm) for nm in chosen), return_exceptions=True)
        out = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException):
                raise r
    except BaseException:
        for f in out:
            with contextlib.suppress(SandboxError):
                await type(sb)._remove(f.name, timeout=5.0, db=f.db)
        raise
    finally:
        # the forks map the template's RAM privately: the mapping outlives the file (and
        # a frozen template's memfd lives as long as a mapping of it)
        shutil.rmtree(template, ignore_errors=True)
        with contextlib.suppress(SandboxError):
            await sb._control({"op": "fork_release"})
    return out


async def _template(sb: AsyncSandbox, template: Path) -> None:
    """The fork template: a snapshot of the source (RAM copied sparse, or streamed for a
    source on a private mapping); or, for a source started with
    ``MICROVM_FORK_IN_PLACE=1``, without a network and with no exec session in flight,
    the source frozen in place (its RAM memfd becomes the template, the source carries
    on as a copy-on-write child of it; see the README's "Fork")."""
    from microvm._snapshot import check_target

    template.parent.mkdir(parents=True, exist_ok=True)
    check_target(template)
    if _not_snapshottable(sb) is None:
        res = await sb._control({"op": "fork_template", "path": str(template),
                                 "extra": _extra(sb)}, timeout=600.0)
        if isinstance(res, dict) and res.get("cow"):
            # the relay was rebuilt on the new VMM: drop the cached connection now
            client, sb._client = sb._client, None
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
            _copy_plugins(sb, template)
            log.debug("fork template of %s frozen in place: %s", sb.name, res)
            return
    await take(sb, template, checksums=False)


async def pause(sb: AsyncSandbox) -> None:
    """Freeze the guest's vCPUs (the supervisor, network and timers stay up).

    Example::

        await pause(sb)
    """
    await sb._control({"op": "pause"})


async def resume(sb: AsyncSandbox) -> None:
    """Run a paused guest again and step its clock to the host's (it stood still).

    Example::

        await resume(sb)
    """
    await sb._control({"op": "resume"})
    client = await sb._agent()
    await client.reconfigure({"clock": {"realtime_ns": time.time_ns()}})


def snapshot_target(name: str) -> Path:
    """Where snapshot ``name`` goes; raises :class:`SnapshotError` when it exists.

    Example::

        snapshot_target("warm")
    """
    validate_name(name)
    path = snapshots_root() / name
    if path.exists():
        raise SnapshotError(f"snapshot {name!r} already exists: remove it first or pick "
                            f"another name")
    return path

