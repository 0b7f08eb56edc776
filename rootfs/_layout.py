"""OCI image layouts and ``docker save`` archives: import into and export from a store.

The store is anything with blobs and tags (:class:`~rootfs.protocols.BlobStore`;
:class:`~rootfs.ImageStore` is one), so this module never imports the store.

Example::

    store = ImageStore()
    images = load_archive(store, Path("busybox.tar"))         # OCI tarball or docker save
    write_oci_layout(store, Path("/tmp/layout"), {"v1": images[0]})
    # skopeo copy oci:/tmp/layout:v1 docker://127.0.0.1:5000/busybox:v1
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from rootfs._fs import atomic_replace, atomic_write
from rootfs._image import (
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    Descriptor,
    Image,
    choose_platform,
    host_platform,
    parse_json,
    parse_manifest,
)
from rootfs._reference import parse_reference, validate_digest
from rootfs.errors import ImageFormatError, RootfsError
from rootfs.protocols import BlobStore

REF_ANNOTATION = "org.opencontainers.image.ref.name"
_MAX_JSON = 16 << 20


class _Source:
    """Read-only access to files of a directory or a tarball, by relative name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            try:
                self.tar = tarfile.open(path, "r:*")  # noqa: SIM115
            except tarfile.TarError as exc:
                raise ImageFormatError(f"{str(path)!r} is not a tar archive: {exc}") from None
            for m in self.tar.getmembers():
                name = os.path.normpath(m.name.removeprefix("./"))
                if m.isreg():
                    self.members[name] = m
        elif not path.is_dir():
            raise ImageFormatError(f"{str(path)!r} is neither a directory nor an archive")

    def _norm(self, name: str) -> str:
        if name.startswith("/") or "\x00" in name or ".." in name.split("/"):
            raise ImageFormatError(f"archive names unsafe path {name!r}")
        return os.path.normpath(name)

    def exists(self, name: str) -> bool:
        n = self._norm(name)
        if self.tar is not None:
            return n in self.members
        return (self.path / n).is_file() and not (self.path / n).is_symlink()

    def open(self, name: str) -> IO[bytes]:
        n = self._norm(name)
        if self.tar is not None:
            m = self.members.get(n)
            f = self.tar.extractfile(m) if m is not None else None
            if f is None:
                raise ImageFormatError(f"archive {str(self.path)!r} has no file {name!r}")
            return f
        p = self.path / n
        if p.is_symlink() or not p.is_file():
            raise ImageFormatError(f"layout {str(self.path)!r} has no regular file {name!r}")
        return open(p, "rb")

    def read_json(self, name: str) -> dict[str, Any]:
        with self.open(name) as f:
            data = f.read(_MAX_JSON + 1)
        if len(data) > _MAX_JSON:
            raise ImageFormatError(f"{name!r} in {str(self.path)!r} is too large")
        return parse_json(data, f"{name} in {self.path}")

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _copy_blob(store: BlobStore, src: _Source, name: str, digest: str | None) -> str:
    """Copy one file of the source into the store (verified if digest given)."""
    if digest is not None and store.has_blob(digest):
        return digest
    with src.open(name) as f:
        return store.put_blob_stream(cast(BinaryIO, f), digest)


def _default_name(path: Path) -> str:
    stem = path.name.split(".")[0].lower()
    stem = re.sub(r"[^a-z0-9]+", "-", stem).strip("-") or "image"
    return f"localhost/{stem}"


def _ref_for(annotation: str | None, path: Path) -> str:
    if annotation:
        if "/" in annotation or ("." in annotation.split(":")[0] and ":" in annotation):
            return str(parse_reference(annotation))
        return str(parse_reference(f"{_default_name(path)}:{annotation}"))
    return str(parse_reference(f"{_default_name(path)}:latest"))


def load_archive(store: BlobStore, path: Path, ref: str | None = None) -> list[Image]:
    """Import an OCI layout (dir or tar) or a ``docker save`` archive; return its images.

    Example (a layout :func:`write_oci_layout` wrote, into another store)::

        >>> import rootfs
        >>> Path("src/etc").mkdir(parents=True)
        >>> _ = Path("src/etc/motd").write_text("hi\\n")
        >>> store = rootfs.ImageStore(Path("images"))
        >>> img = rootfs.build_image(Path("src"), "local/app:1", store)
        >>> rootfs.write_oci_layout(store, Path("out"), {"v1": img})
        >>> other = rootfs.ImageStore(Path("other"))
        >>> [i.ref for i in rootfs.load_archive(other, Path("out"), ref="local/copy:1")]
        ['docker.io/local/copy:1']
        >>> other.get("local/copy:1").id == img.id
        True
    """
    src = _Source(path)
    try:
        if src.exists("index.json") and src.exists("oci-layout"):
            images = _load_oci(store, src, path)
        elif src.exists("manifest.json"):
            images = _load_docker(store, src, path)
        else:
            raise ImageFormatError(
                f"{str(path)!r} is neither an OCI layout (oci-layout + index.json) "
                "nor a docker save archive (manifest.json)"
            )
    finally:
        src.close()
    if ref is not None:
        if len(images) != 1:
            raise RootfsError(f"ref={ref!r} given but {str(path)!r} holds {len(images)} images")
        return [store.tag(ref, images[0].digest)]
    return images


def _load_oci(store: BlobStore, src: _Source, path: Path) -> list[Image]:
    layout = src.read_json("oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise ImageFormatError(f"{str(path)!r}: unsupported imageLayoutVersion")
    index = src.read_json("index.json")
    out: list[Image] = []
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageFormatError(f"{str(path)!r}: index.json lists no manifests")
    for i, entry in enumerate(manifests):
        desc = Descriptor.from_json(entry, f"index.json entry {i}")
        annotations = entry.get("annotations") if isinstance(entry, dict) else None
        ann = annotations.get(REF_ANNOTATION) if isinstance(annotations, dict) else None
        digest = desc.digest
        body_name = "blobs/" + digest.replace(":", "/")
        _copy_blob(store, src, body_name, digest)
        body = store.read_blob(digest)
        obj = parse_json(body, f"manifest {digest}")
        if desc.media_type in INDEX_TYPES or "manifests" in obj:
            chosen = choose_platform(obj, host_platform(), f"{path}")
            digest = chosen.digest
            _copy_blob(store, src, "blobs/" + digest.replace(":", "/"), digest)
            body = store.read_blob(digest)
        config, layers = parse_manifest(body, f"manifest {digest}")
        for d in (config, *layers):
            _copy_blob(store, src, "blobs/" + d.digest.replace(":", "/"), d.digest)
        out.append(store.tag(_ref_for(ann if isinstance(ann, str) else None, path), digest))
    return out


def _load_docker(store: BlobStore, src: _Source, path: Path) -> list[Image]:
    with src.open("manifest.json") as f:
        try:
            entries = json.loads(f.read(_MAX_JSON))
        except ValueError as exc:
            raise ImageFormatError(f"{str(path)!r}: manifest.json is not JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise ImageFormatError(f"{str(path)!r}: manifest.json must be a non-empty list")
    out: list[Image] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("Config"), str) \
                or not isinstance(e.get("Layers"), list):
            raise ImageFormatError(f"{str(path)!r}: manifest.json entry {i} lacks Config/Layers")
        config_digest = _copy_blob(store, src, e["Config"], None)
        config_bytes = store.read_blob(config_digest)
        layer_descs = []
        for name in e["Layers"]:
            if not isinstance(name, str):
                raise ImageFormatError(f"{str(path)!r}: bad layer name {name!r}")
            d = _copy_blob(store, src, name, None)
            layer_descs.append({"mediaType": OCI_LAYER_TAR, "digest": d,
                                "size": store.blob_path(d).stat().st_size})
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                       "size": len(config_bytes)},
            "layers": layer_descs,
        }
        mdigest = store.put_blob(json.dumps(manifest, sort_keys=True).encode())
        tags = [t for t in (e.get("RepoTags") or []) if isinstance(t, str)]
        names = tags or [_ref_for(None, path)]
        for t in names:
            img = store.tag(t, mdigest)
        out.append(img)
    return out


def _link_blob(store: BlobStore, dest: Path, digest: str) -> dict[str, Any]:
    validate_digest(digest)
    algo, _, hexpart = digest.partition(":")
    target = dest / "blobs" / algo / hexpart
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            os.link(store.blob_path(digest), target)
        except OSError:  # no hard link (another filesystem, say): a copy, published whole
            with atomic_replace(target, 0o644) as tmp:
                shutil.copyfile(store.blob_path(digest), tmp)
    return {"digest": digest, "size": target.stat().st_size}


def write_oci_layout(
    store: BlobStore, dest: Path, tags: Mapping[str, Image | Sequence[Image]]
) -> None:
    """Export images as an OCI layout at ``dest``; a sequence becomes a multi-arch index.

    Example (``{"multi": [amd64_img, arm64_img]}`` writes an index)::

        >>> import rootfs
        >>> Path("src/etc").mkdir(parents=True)
        >>> _ = Path("src/etc/motd").write_text("hi\\n")
        >>> store = rootfs.ImageStore(Path("images"))
        >>> img = rootfs.build_image(Path("src"), "local/app:1", store)
        >>> rootfs.write_oci_layout(store, Path("out"), {"latest": img})
        >>> sorted(p.name for p in Path("out").iterdir())
        ['blobs', 'index.json', 'oci-layout']
    """
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write(dest / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    index_path = dest / "index.json"
    existing: list[dict[str, Any]] = []
    if index_path.exists():
        existing = json.loads(index_path.read_text()).get("manifests", [])
    entries = [e for e in existing if e.get("annotations", {}).get(REF_ANNOTATION) not in tags]
    for tag, what in tags.items():
        imgs = [what] if isinstance(what, Image) else list(what)
        descs = []
        for img in imgs:
            for d in (img.config_digest, *(ly.digest for ly in img.layers)):
                _link_blob(store, dest, d)
            info = _link_blob(store, dest, img.digest)
            desc: dict[str, Any] = {"mediaType": OCI_MANIFEST, **info}
            if not isinstance(what, Image):
                desc["platform"] = {"os": str(img.config.get("os", "linux")),
                                    "architecture": str(img.config.get("architecture", "amd64"))}
            descs.append(desc)
        if isinstance(what, Image):
            top = descs[0]
        else:
            body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs},
                              sort_keys=True).encode()
            digest = store.put_blob(body)
            top = {"mediaType": OCI_INDEX, **_link_blob(store, dest, digest)}
        top["annotations"] = {REF_ANNOTATION: tag}
        entries.append(top)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    atomic_write(index_path, json.dumps(index, indent=1).encode())


def save_archive(store: BlobStore, images: Sequence[Image], dest: Path, work_dir: Path) -> Path:
    """Export ``images`` as an OCI layout: a directory, or a tarball if ``dest`` ends in .tar.

    Each image is annotated with its full reference, so :func:`load_archive` restores
    the tags. ``work_dir`` (same filesystem as the store) holds the layout of a tarball
    while it is written.

    Example::

        save_archive(store, [img], Path("/tmp/busybox.tar"), store.home / "tmp")
    """
    out = dest
    as_tar = out.suffix == ".tar"
    if out.exists():
        raise RootfsError(f"save destination {str(out)!r} already exists")
    parent = out.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise RootfsError(f"cannot save to {str(out)!r}: {str(parent)!r} is not a "
                          "writable directory")
    work = Path(tempfile.mkdtemp(dir=work_dir, prefix="save-")) if as_tar else out
    try:
        write_oci_layout(store, work, {img.ref: img for img in images})
        if as_tar:
            with atomic_replace(out, 0o644) as tmp, tarfile.open(tmp, "w") as tar:
                for name in sorted(os.listdir(work)):
                    tar.add(work / name, arcname=name)
    except OSError as exc:
        if not as_tar:
            shutil.rmtree(out, ignore_errors=True)
        raise RootfsError(f"cannot save to {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        if as_tar:
            shutil.rmtree(work, ignore_errors=True)
    return out
