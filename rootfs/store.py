"""The content-addressed image store: pull, load, list, remove, prune, unpack, prepare.

Layout under ``home`` (default ``$MICROVM_HOME/images``)::

    blobs/sha256/<hex>        manifests, configs and compressed layers (verified)
    refs/<key>.json           reference -> manifest digest
    rootfs/<config-hex>/      flattened root tree (built once, read-only use)
    disks/<config-hex>.erofs  read-only image disk shared by every sandbox
    prepared/<id>/meta.json   one prepared root: its image, owner and upper disk
    prepared/<id>/upper.ext4  its upper disk (patches baked in) when no ``dest`` was given
    locks/, tmp/

Prepared roots have an owner and a lifetime: with ``dest`` the owner is that
directory (the root lives while it exists); without, it is the process that called
:meth:`ImageStore.prepare` (pid + start time from ``/proc/PID/stat``).
:meth:`PreparedRoot.remove` frees one at once; :meth:`ImageStore.prune` frees every
prepared root whose owner is gone, then the image content nothing uses any more.

Writes go to ``tmp/`` and are renamed into place; file locks make concurrent
pulls of the same image share the work.

Example::

    store = ImageStore()
    img = store.pull("127.0.0.1:5000/busybox:latest", insecure=True)
    root = store.prepare(img, patches=[Patch.text("/etc/motd", "hi\\n")])
    print(root.mount_plan())
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import platform as _platform
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rootfs._fs import atomic_write, lock, microvm_home, process_start_time
from rootfs.disks import PreparedRoot, build_erofs, build_ext4, ext4_size_for
from rootfs.errors import (
    AuthError,
    DigestError,
    DiskError,
    ImageFormatError,
    ImageNotFoundError,
    RegistryError,
    RootfsError,
)
from rootfs.image import (
    INDEX_TYPES,
    Descriptor,
    Image,
    parse_config,
    parse_json,
    parse_manifest,
)
from rootfs.patches import Patch, PatchTarget
from rootfs.reference import Reference, parse_reference, validate_digest
from rootfs.registry import CaCerts, ProgressFn, RegistryAuth, RegistryClient
from rootfs.unpack import UnpackLimits, UnpackState, apply_layer

PullPolicy = Literal["always", "if-missing", "never"]
_POLICIES = ("always", "if-missing", "never")


def host_platform() -> str:
    """``linux/amd64`` or ``linux/arm64`` for this machine (amd64 if unknown).

    Example::

        store.pull("alpine", platform=host_platform())
    """
    m = _platform.machine().lower()
    return "linux/arm64" if m in ("aarch64", "arm64") else "linux/amd64"


@dataclass(frozen=True)
class PruneResult:
    """What :meth:`ImageStore.prune` deleted (``prepared``: prepared roots of gone owners).

    Example::

        print(store.prune().bytes_freed)
    """

    blobs: int
    trees: int
    disks: int
    bytes_freed: int
    prepared: int = 0


class ImageStore:
    """Images on local disk; see the module docstring for the layout.

    Example::

        store = ImageStore(Path("/tmp/images"))
        img = rootfs.build_image(Path("rootdir"), "local/app:1", store)
        assert store.get("local/app:1") == img
    """

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 *, limits: UnpackLimits | None = None,
                 staging_dir: str | os.PathLike[str] | Literal["auto"] | None = "auto") -> None:
        self.home = (Path(home) if home is not None else microvm_home() / "images").absolute()
        self.limits = limits or UnpackLimits()
        # Patches are staged in RAM (tmpfs) before mkfs.ext4 -d copies them into the upper
        # disk: faster than a busy disk. None stages next to the upper disk.
        self.staging_dir: Path | None = None
        if staging_dir == "auto":
            shm = Path("/dev/shm")
            if shm.is_dir() and os.access(shm, os.W_OK):
                self.staging_dir = shm
        elif staging_dir is not None:
            self.staging_dir = Path(staging_dir)
        try:
            for sub in ("blobs/sha256", "refs", "rootfs", "disks", "prepared", "locks", "tmp"):
                (self.home / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RootfsError(_home_problem(self.home, home is None, exc)) from None

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        """Where blob ``digest`` lives (it may not exist).

        Example::

            store.blob_path(img.layers[0].digest)
        """
        algo, _, hexpart = validate_digest(digest).partition(":")
        return self.home / "blobs" / algo / hexpart

    def has_blob(self, digest: str) -> bool:
        """Whether blob ``digest`` is stored.

        Example::

            store.has_blob(img.config_digest)
        """
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        """The bytes of a stored blob (raises ImageNotFoundError).

        Example::

            json.loads(store.read_blob(img.digest))
        """
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(f"blob {digest} is not in the store") from None

    def put_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (verified against ``digest`` if given); return its digest.

        Example::

            d = store.put_blob(b"{}")
        """
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != got:
            raise DigestError(f"blob digest mismatch: expected {digest}, got {got}")
        path = self.blob_path(got)
        if not path.exists():
            atomic_write(path, data, 0o444)
        return got

    def put_blob_file(self, src: Path, digest: str | None = None) -> str:
        """Copy a file into the blob store after hashing it; return its digest.

        Example::

            store.put_blob_file(Path("layer.tar.gz"))
        """
        sha = hashlib.sha256()
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        got = "sha256:" + sha.hexdigest()
        if digest is not None and digest != got:
            raise DigestError(f"blob digest mismatch: expected {digest}, got {got}")
        path = self.blob_path(got)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.home / "tmp")
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)
        return got

    # -- refs ----------------------------------------------------------------
    def _ref_path(self, ref: Reference) -> Path:
        key = hashlib.sha256(str(ref).encode()).hexdigest()[:40]
        return self.home / "refs" / f"{key}.json"

    def tag(self, ref: str | Reference, manifest_digest: str) -> Image:
        """Point ``ref`` at a stored manifest; return the image.

        Example::

            store.tag("local/app:stable", img.digest)
        """
        r = parse_reference(ref) if isinstance(ref, str) else ref
        img = self._image_from_manifest(str(r), manifest_digest)
        record = {"ref": str(r), "digest": manifest_digest, "time": time.time()}
        atomic_write(self._ref_path(r), json.dumps(record).encode())
        return img

    def _image_from_manifest(self, ref: str, digest: str) -> Image:
        body = self.read_blob(digest)
        config_desc, layers = parse_manifest(body, f"manifest {digest}")
        config_bytes = self.read_blob(config_desc.digest)
        diff_ids = parse_config(config_bytes, len(layers), f"config {config_desc.digest}")
        cfg = parse_json(config_bytes, "config")
        return Image(ref, digest, config_desc.digest, layers, diff_ids, cfg)

    def _lookup(self, r: Reference) -> Image | None:
        path = self._ref_path(r)
        if path.exists():
            rec = json.loads(path.read_text())
            return self._image_from_manifest(str(r), rec["digest"])
        if r.digest is not None and self.has_blob(r.digest):
            try:
                return self._image_from_manifest(str(r), r.digest)
            except ImageFormatError:
                return None  # an index: needs a platform resolution via pull
        return None

    def get(self, ref: str | Image) -> Image:
        """The stored image for ``ref`` (raises :class:`ImageNotFoundError`).

        Example::

            img = store.get("busybox:test")
        """
        if isinstance(ref, Image):
            return ref
        r = parse_reference(ref)
        img = self._lookup(r)
        if img is None:
            raise ImageNotFoundError(f"image {str(r)!r} is not in the store (pull or load it)")
        return img

    def list(self) -> builtins.list[Image]:
        """Every tagged image, sorted by reference.

        Example::

            for img in store.list(): print(img.ref, img.digest)
        """
        out = []
        for p in sorted((self.home / "refs").glob("*.json")):
            try:
                rec = json.loads(p.read_text())
                out.append(self._image_from_manifest(rec["ref"], rec["digest"]))
            except (OSError, ValueError, KeyError, RootfsError):
                continue
        return sorted(out, key=lambda i: i.ref)

    def remove(self, ref: str | Image) -> None:
        """Untag ``ref`` (content goes at the next :meth:`prune`).

        Example::

            store.remove("busybox:test")
        """
        name = ref.ref if isinstance(ref, Image) else ref
        r = parse_reference(name)
        path = self._ref_path(r)
        if not path.exists():
            raise ImageNotFoundError(f"image {str(r)!r} is not in the store")
        path.unlink()

    # -- pull ----------------------------------------------------------------
    def pull(
        self,
        ref: str,
        *,
        auth: RegistryAuth | tuple[str, str] | None = None,
        insecure: bool = False,
        ca_certs: CaCerts | None = None,
        policy: PullPolicy = "if-missing",
        progress: ProgressFn | None = None,
        platform: str | None = None,
        max_workers: int = 4,
    ) -> Image:
        """Fetch ``ref`` from its registry (registry v2), verifying every digest.

        ``policy``: ``if-missing`` (default) uses a stored image, ``always``
        refreshes the manifest (reusing stored layers), ``never`` only looks locally.
        ``progress(layer_digest, done, total)`` is called as bytes arrive.

        Example::

            img = store.pull("registry.test:5443/app:1", ca_certs="ca.pem",
                             auth=RegistryAuth("u", "p"))
        """
        if policy not in _POLICIES:
            raise RootfsError(f"bad pull policy {policy!r}: use one of {', '.join(_POLICIES)}")
        r = parse_reference(ref)
        if policy != "always":
            found = self._lookup(r)
            if found is not None:
                return found
            if policy == "never":
                raise ImageNotFoundError(f"image {str(r)!r} is not in the store (policy=never)")
        plat = platform or host_platform()
        client = RegistryClient(r.registry, api_host=r.api_host, auth=auth, insecure=insecure,
                                ca_certs=ca_certs)
        try:
            with lock(self.home / "locks", "ref-" + hashlib.sha256(str(r).encode()).hexdigest()):
                if policy == "if-missing":
                    found = self._lookup(r)
                    if found is not None:
                        return found
                body, mt, digest = client.get_manifest(r.repository, r.selector)
                obj = parse_json(body, f"manifest of {r}")
                if mt in INDEX_TYPES or "manifests" in obj:
                    self.put_blob(body, digest)
                    chosen = _choose_platform(obj, plat, str(r))
                    body, mt, digest = client.get_manifest(r.repository, chosen.digest)
                config_desc, layers = parse_manifest(body, f"manifest of {r}")
                if not self.has_blob(config_desc.digest):
                    self._fetch(client, r, config_desc, None)
                parse_config(self.read_blob(config_desc.digest), len(layers),
                             f"config of {r}")
                missing = [ly for ly in layers if not self.has_blob(ly.digest)]
                for ly in layers:
                    if ly not in missing:
                        os.utime(self.blob_path(ly.digest))  # fresh again: prune keeps it
                if missing:
                    workers = max(1, min(max_workers, len(missing)))
                    with ThreadPoolExecutor(workers) as pool:
                        futs = [pool.submit(self._fetch, client, r, ly, progress) for ly in missing]
                        for fut in futs:
                            fut.result()
                self.put_blob(body, digest)
                return self.tag(r, digest)
        finally:
            client.close()

    def _fetch(self, client: RegistryClient, r: Reference, desc: Descriptor,
               progress: ProgressFn | None) -> None:
        with lock(self.home / "locks", "blob-" + desc.digest.partition(":")[2]):
            if self.has_blob(desc.digest):
                if progress is not None:
                    progress(desc.digest, desc.size, desc.size)
                return
            fd, tmp = tempfile.mkstemp(dir=self.home / "tmp", prefix="blob-")
            try:
                with os.fdopen(fd, "wb") as f:
                    attempt = 0
                    while True:
                        try:
                            client.fetch_blob(r.repository, desc.digest, f, size=desc.size,
                                              progress=progress)
                            break
                        except (AuthError, DigestError, ImageNotFoundError):
                            raise
                        except RegistryError:
                            # A connection dropped mid-stream: start the blob again.
                            if attempt >= client.retries:
                                raise
                            time.sleep(client.backoff * (2 ** attempt))
                            attempt += 1
                            f.seek(0)
                            f.truncate()
                os.chmod(tmp, 0o444)
                os.replace(tmp, self.blob_path(desc.digest))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    # -- load ----------------------------------------------------------------
    def load(self, path: str | os.PathLike[str], ref: str | None = None) -> builtins.list[Image]:
        """Import an OCI layout (directory or tarball) or a ``docker save`` archive.

        Images are tagged with their annotated/RepoTags names, or ``ref`` if given.

        Example::

            [img] = store.load("busybox-oci.tar", ref="local/busybox:1")
        """
        from rootfs.layout import load_archive

        return load_archive(self, Path(path), ref)

    def save(self, refs: str | Image | Iterable[str | Image],
             dest: str | os.PathLike[str]) -> Path:
        """Export images as an OCI layout: a directory, or a tarball if ``dest`` ends in .tar.

        Each image is annotated with its full reference, so :meth:`load` restores the tags.

        Example::

            store.save("local/busybox:latest", "/tmp/busybox.tar")
        """
        from rootfs.layout import write_oci_layout

        items = [refs] if isinstance(refs, (str, Image)) else list(refs)
        images = [self.get(r) for r in items]
        out = Path(dest)
        as_tar = out.suffix == ".tar"
        if out.exists():
            raise RootfsError(f"save destination {str(out)!r} already exists")
        parent = out.absolute().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise RootfsError(f"cannot save to {str(out)!r}: {str(parent)!r} is not a "
                              "writable directory")
        work = Path(tempfile.mkdtemp(dir=self.home / "tmp", prefix="save-")) if as_tar else out
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            write_oci_layout(self, work, {img.ref: img for img in images})
            if as_tar:
                import tarfile

                with tarfile.open(tmp, "w") as tar:
                    for name in sorted(os.listdir(work)):
                        tar.add(work / name, arcname=name)
                os.replace(tmp, out)
        except OSError as exc:
            if not as_tar:
                shutil.rmtree(out, ignore_errors=True)
            raise RootfsError(f"cannot save to {str(out)!r}: {exc.strerror or exc}") from None
        finally:
            if as_tar:
                shutil.rmtree(work, ignore_errors=True)
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return out

    # -- unpack --------------------------------------------------------------
    def unpack(self, image: Image | str, dest: str | os.PathLike[str],
               *, limits: UnpackLimits | None = None) -> UnpackState:
        """Flatten the image's layers into ``dest`` (must be absent or empty).

        Whiteouts/opaque dirs applied; hardlinks, symlinks, modes, xattrs and (as
        root) ownership kept. Hostile layers raise :class:`UnsafeLayerError`.

        Example::

            store.unpack(img, "/tmp/busybox-root")
        """
        img = self.get(image) if isinstance(image, str) else image
        d = Path(dest)
        existed = d.exists()
        if existed and (not d.is_dir() or any(d.iterdir())):
            raise RootfsError(f"unpack destination {str(d)!r} exists and is not an empty dir")
        d.mkdir(parents=True, exist_ok=True)
        state = UnpackState(limits or self.limits)
        try:
            for layer, diff_id in zip(img.layers, img.diff_ids, strict=True):
                path = self.blob_path(layer.digest)
                if not path.exists():
                    raise ImageNotFoundError(
                        f"layer {layer.digest} of {img.ref} is not in the store")
                with open(path, "rb") as f:
                    apply_layer(f, d, state=state, expected_diff_id=diff_id)
        except BaseException:
            # Never leave a half-applied tree behind (dest was empty or absent).
            if existed:
                for child in d.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink()
            else:
                shutil.rmtree(d, ignore_errors=True)
            raise
        return state

    def rootfs_dir(self, image: Image | str) -> Path:
        """The store's cached flattened tree of ``image`` (built on first use).

        Example::

            (store.rootfs_dir(img) / "bin" / "busybox").exists()
        """
        img = self.get(image) if isinstance(image, str) else image
        hexid = img.id.partition(":")[2]
        final = self.home / "rootfs" / hexid
        if final.is_dir():
            return final
        with lock(self.home / "locks", "rootfs-" + hexid):
            if final.is_dir():
                return final
            tmp = Path(tempfile.mkdtemp(dir=self.home / "tmp", prefix="rootfs-"))
            try:
                os.chmod(tmp, 0o755)
                self.unpack(img, tmp / "root")
                os.replace(tmp / "root", final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def image_disk(self, image: Image | str, fmt: Literal["erofs", "ext4"] = "erofs") -> Path:
        """The read-only image disk for ``image`` (built once per image id, then shared).

        Example::

            store.image_disk(img)  # .../disks/<hex>.erofs
        """
        if fmt not in ("erofs", "ext4"):
            raise DiskError(f"image disk format {fmt!r} not supported: use 'erofs' or 'ext4'")
        img = self.get(image) if isinstance(image, str) else image
        hexid = img.id.partition(":")[2]
        final = self.home / "disks" / f"{hexid}.{fmt}"
        if final.exists():
            return final
        tree = self.rootfs_dir(img)
        with lock(self.home / "locks", f"disk-{hexid}-{fmt}"):
            if final.exists():
                return final
            fd, tmp = tempfile.mkstemp(dir=self.home / "tmp", prefix=f"disk-{fmt}-")
            os.close(fd)
            try:
                if fmt == "erofs":
                    build_erofs(tree, Path(tmp))
                else:
                    build_ext4(tree, Path(tmp), ext4_size_for(tree), label="rootfs")
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return final

    # -- prepare -------------------------------------------------------------
    def prepare(
        self,
        image: Image | str,
        *,
        patches: Iterable[Patch] = (),
        upper_size_mib: int = 4096,
        image_format: Literal["erofs", "ext4"] = "erofs",
        dest: str | os.PathLike[str] | None = None,
    ) -> PreparedRoot:
        """Image disk (shared, cached) + a fresh sparse ext4 upper disk with patches baked in.

        The upper disk's root holds ``upper/`` (overlay upperdir) and ``work/``.
        ``dest`` is the per-sandbox directory (default ``prepared/<random id>``).

        Lifetime: call :meth:`PreparedRoot.remove` when done. Otherwise the root lives
        while its owner does: the ``dest`` directory if given, else the calling process
        (its pid and start time are recorded); :meth:`prune` frees the rest.

        Example::

            root = store.prepare(img, patches=[Patch.remove("/etc/motd")], upper_size_mib=512)
            root.mount_plan()["upper"]["disk"]
            root.remove()
        """
        img = self.get(image) if isinstance(image, str) else image
        if isinstance(upper_size_mib, bool) or not isinstance(upper_size_mib, int) \
                or not 8 <= upper_size_mib <= (1 << 24):
            raise DiskError(f"upper_size_mib={upper_size_mib!r}: must be an int in 8..16777216")
        plist = list(patches)
        disk = self.image_disk(img, image_format)
        lower = self.rootfs_dir(img)
        record = self.home / "prepared" / uuid.uuid4().hex
        sandbox = Path(dest).absolute() if dest is not None else record
        try:
            sandbox.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DiskError(f"cannot create prepare dest {str(sandbox)!r}: "
                            f"{exc.strerror or exc}") from None
        record.mkdir(mode=0o700, parents=True, exist_ok=True)
        upper = sandbox / "upper.ext4"
        meta: dict[str, Any] = {"image": img.ref, "image_id": img.id, "digest": img.digest,
                                "image_disk": str(disk), "sandbox_dir": str(sandbox),
                                "upper_disk": str(upper), "created": time.time()}
        if dest is None:
            meta["owner"] = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
        # recorded before the slow work: a prepare killed half-way is still pruned
        atomic_write(record / "meta.json", json.dumps({**meta, "complete": False}).encode())
        staging = Path(tempfile.mkdtemp(dir=self.staging_dir or sandbox, prefix=".staging-"))
        ok = False
        try:
            # The overlay's merged root takes its attributes from upperdir: mirror the image.
            root_st = os.stat(lower)
            (staging / "upper").mkdir()
            os.chmod(staging / "upper", stat.S_IMODE(root_st.st_mode))
            (staging / "work").mkdir(0o700)
            if os.geteuid() == 0:
                os.chown(staging / "upper", root_st.st_uid, root_st.st_gid)
            elif plist:
                raise DiskError("baking patches into the upper disk needs root (the guest "
                                "must see root-owned files, whiteouts and trusted xattrs)")
            PatchTarget(staging / "upper", lower).apply(plist)
            build_ext4(staging, upper, upper_size_mib, label="upper")
            os.chmod(upper, 0o600)  # patches may carry secrets
            atomic_write(record / "meta.json", json.dumps({**meta, "complete": True}).encode())
            ok = True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if not ok:
                shutil.rmtree(record, ignore_errors=True)
                if dest is None:
                    shutil.rmtree(sandbox, ignore_errors=True)
                elif upper.exists():
                    upper.unlink()
        return PreparedRoot(kind="overlay", image_disk=disk, image_format=image_format,
                            upper_disk=upper, sandbox_dir=sandbox, image_id=img.id,
                            record_dir=record)

    # -- prune ---------------------------------------------------------------
    def prune(self, *, grace_seconds: float = 600.0) -> PruneResult:
        """Free prepared roots whose owner is gone, then the blobs, trees and disks no
        tag or remaining prepared root uses.

        A prepared root's owner is its ``dest`` directory (gone = removed) or, without
        ``dest``, the process that prepared it (gone = that pid no longer runs with the
        recorded start time). Records from before owners were recorded count as gone
        once older than ``grace_seconds``. Content younger than ``grace_seconds`` is
        kept, so a pull or load running in another process (blobs stored, tag not yet
        written) is never pruned.

        Example::

            store.remove("busybox:old"); store.prune(grace_seconds=0)
        """
        cutoff = time.time() - grace_seconds
        keep_blobs: set[str] = set()
        keep_ids: set[str] = set()
        prepared, freed = self._prune_prepared(cutoff)
        for p in (self.home / "refs").glob("*.json"):
            try:
                rec = json.loads(p.read_text())
                img = self._image_from_manifest(rec["ref"], rec["digest"])
            except (OSError, ValueError, KeyError, RootfsError):
                continue
            keep_blobs.update({img.digest, img.config_digest, *(ly.digest for ly in img.layers)})
            keep_ids.add(img.id.partition(":")[2])
        for meta in (self.home / "prepared").glob("*/meta.json"):
            try:
                rec = json.loads(meta.read_text())
                img = self._image_from_manifest(rec["image"], rec["digest"])
            except (OSError, ValueError, KeyError, RootfsError):
                continue
            keep_blobs.update({img.digest, img.config_digest, *(ly.digest for ly in img.layers)})
            keep_ids.add(img.id.partition(":")[2])
        blobs = trees = disks = 0
        with lock(self.home / "locks", "prune"):
            for p in (self.home / "blobs" / "sha256").iterdir():
                st = p.stat()
                if f"sha256:{p.name}" not in keep_blobs and not p.name.startswith(".") \
                        and st.st_mtime < cutoff:
                    freed += st.st_size
                    p.unlink()
                    blobs += 1
            for p in (self.home / "rootfs").iterdir():
                if p.name not in keep_ids and p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
                    trees += 1
            for p in (self.home / "disks").iterdir():
                if p.name.partition(".")[0] not in keep_ids and p.stat().st_mtime < cutoff:
                    freed += p.stat().st_blocks * 512
                    p.unlink()
                    disks += 1
        return PruneResult(blobs, trees, disks, freed, prepared)

    def _prune_prepared(self, cutoff: float) -> tuple[int, int]:
        """Remove prepared roots whose owner is gone; (count, bytes freed)."""
        count = freed = 0
        for record in (self.home / "prepared").iterdir():
            if not record.is_dir():
                continue
            try:
                rec = json.loads((record / "meta.json").read_text())
                if not isinstance(rec, dict):
                    raise ValueError("not a record")
            except FileNotFoundError:
                rec = None  # a prepare from before meta.json came first, or a crashed one
            except (OSError, ValueError):
                rec = None
            if not _owner_gone(record, rec, cutoff):
                continue
            # without dest the upper disk is in the record; with dest it went with dest
            freed += sum(_disk_usage(p) for p in record.rglob("*") if p.is_file())
            shutil.rmtree(record, ignore_errors=True)
            count += 1
        return count, freed


def _owner_gone(record: Path, rec: dict[str, Any] | None, cutoff: float) -> bool:
    """Whether the prepared root at ``record`` has lost its owner (see :meth:`prune`)."""
    if rec is None:  # no readable record: judge by age only
        try:
            return record.stat().st_mtime < cutoff
        except OSError:
            return False
    owner = rec.get("owner")
    if isinstance(owner, dict):
        pid, start = owner.get("pid"), owner.get("start")
        if not isinstance(pid, int) or isinstance(pid, bool):
            return True
        now = process_start_time(pid)
        return now is None or (start is not None and now != start)
    sandbox = Path(str(rec.get("sandbox_dir") or record))
    if sandbox != record:  # the owner is the dest directory
        return not sandbox.is_dir()
    created = rec.get("created")  # a record from before owners were recorded
    return not isinstance(created, int | float) or created < cutoff


def _disk_usage(p: Path) -> int:
    try:
        return p.stat().st_blocks * 512
    except OSError:
        return 0


def _home_problem(home: Path, default: bool, exc: OSError) -> str:
    """One line saying why the store directory ``home`` cannot be used."""
    env = os.environ.get("MICROVM_HOME")
    src = f" (from MICROVM_HOME={env!r})" if default and env else ""
    for p in (home, *home.parents):
        if p.is_symlink() or p.exists():
            if not p.is_dir():
                return (f"cannot use image store {str(home)!r}{src}: {str(p)!r} is not a "
                        "directory")
            break
    return f"cannot use image store {str(home)!r}{src}: {exc.strerror or exc}"


def _choose_platform(index: dict[str, Any], plat: str, what: str) -> Descriptor:
    want_os, _, rest = plat.partition("/")
    want_arch, _, want_variant = rest.partition("/")
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ImageFormatError(f"index of {what}: 'manifests' must be a list")
    seen = []
    for i, m in enumerate(manifests):
        d = Descriptor.from_json(m, f"index of {what} entry {i}")
        p = d.platform or {}
        seen.append(f"{p.get('os', '?')}/{p.get('architecture', '?')}")
        if p.get("os") == want_os and p.get("architecture") == want_arch and (
            not want_variant or p.get("variant") == want_variant
        ):
            return d
    raise ImageNotFoundError(
        f"{what} has no {plat} image (available: {', '.join(seen) or 'none'})"
    )
