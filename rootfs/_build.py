"""Build images into a store: from a directory (one layer) or from layer tarballs.

Example::

    store = ImageStore()
    root = Path("/tmp/bb"); (root / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    os.symlink("busybox", root / "bin/sh")
    img = build_image(root, "local/busybox:latest", store, config={"Cmd": ["/bin/sh"]})
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rootfs._image import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Image
from rootfs._reference import parse_reference
from rootfs.errors import ImageFormatError, RootfsError

if TYPE_CHECKING:
    from rootfs._store import ImageStore

_CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts",
                "Volumes", "StopSignal")
_STR_LISTS = ("Cmd", "Entrypoint", "Env")
_STRS = ("WorkingDir", "User", "StopSignal")
_EMPTY_OBJECT_MAPS = ("ExposedPorts", "Volumes")
_PORT = re.compile(r"^([0-9]{1,5})(/(tcp|udp|sctp))?$")
_ENV_NAME = re.compile(r"^[^=\x00]+$")


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check build-time OCI config fields against the image-spec types; return a copy.

    ``Cmd``/``Entrypoint``/``Env``: lists of strings (``Env`` entries ``KEY=VALUE``);
    ``WorkingDir``/``User``/``StopSignal``: strings; ``Labels``: string -> string;
    ``ExposedPorts``: ``"port[/tcp|udp|sctp]"`` -> ``{}``; ``Volumes``: path -> ``{}``.
    ``None`` means unset (dropped). No string may contain NUL. Anything else raises
    :class:`~rootfs.errors.ImageFormatError` naming the key and what is allowed.

    Example::

        >>> validate_config({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "User": None})
        {'Cmd': ['/bin/sh'], 'Env': ['PATH=/bin']}
        >>> validate_config({"Cmd": "notalist"})
        Traceback (most recent call last):
        ...
        rootfs.errors.ImageFormatError: image config Cmd must be a list of strings, got 'notalist'
    """
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ImageFormatError(f"image config must be a mapping of OCI config fields, got "
                               f"{_short(config)}")
    bad = [k for k in config if k not in _CONFIG_KEYS]
    if bad:
        raise ImageFormatError(f"unknown image config key(s) {bad}: use {', '.join(_CONFIG_KEYS)}")
    out: dict[str, Any] = {}
    for key, v in config.items():
        if v is None:
            continue
        if key in _STR_LISTS:
            if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
                raise ImageFormatError(f"image config {key} must be a list of strings, got "
                                       f"{_short(v)}")
            if any("\x00" in x for x in v):
                raise ImageFormatError(f"image config {key} must not contain NUL characters")
            if key == "Env":
                for e in v:
                    name, eq, _ = e.partition("=")
                    if not eq or not _ENV_NAME.match(name):
                        raise ImageFormatError(
                            f"image config Env entry {_short(e)} must be KEY=VALUE with a "
                            "non-empty KEY")
            out[key] = list(v)
        elif key in _STRS:
            if not isinstance(v, str) or "\x00" in v:
                raise ImageFormatError(f"image config {key} must be a string without NUL, got "
                                       f"{_short(v)}")
            if key == "WorkingDir" and v and not v.startswith("/"):
                raise ImageFormatError(f"image config WorkingDir must be an absolute path, got "
                                       f"{_short(v)}")
            out[key] = v
        elif key == "Labels":
            if not isinstance(v, Mapping) or not all(
                    isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
                raise ImageFormatError(f"image config Labels must map strings to strings, got "
                                       f"{_short(v)}")
            out[key] = dict(v)
        else:  # ExposedPorts, Volumes: keys -> {}
            what = "ports like '80/tcp'" if key == "ExposedPorts" else "absolute paths"
            if not isinstance(v, Mapping) or not all(
                    isinstance(k, str) and isinstance(x, Mapping) and not x for k, x in v.items()):
                raise ImageFormatError(f"image config {key} must map {what} to {{}}, got "
                                       f"{_short(v)}")
            for k in v:
                m = _PORT.match(k) if key == "ExposedPorts" else None
                ok = (m is not None and 0 < int(m.group(1)) < 65536) if key == "ExposedPorts" \
                    else (k.startswith("/") and "\x00" not in k)
                if not ok:
                    raise ImageFormatError(f"image config {key} key {_short(k)} is not one of "
                                           f"the {what}")
            out[key] = {k: {} for k in v}
    return out


def _hash_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def tar_directory(src: Path, out: Path, *, owner: tuple[int, int] | None = (0, 0)) -> None:
    """Write a deterministic (sorted, PAX) tar of ``src``'s contents to ``out``.

    ``owner`` forces uid/gid (default root); ``None`` keeps the files' owners.

    Example::

        tar_directory(Path("rootdir"), Path("layer.tar"))
    """
    if not src.is_dir():
        raise RootfsError(f"image source {str(src)!r} is not a directory")

    def fix(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        if owner is not None:
            ti.uid, ti.gid = owner
            ti.uname = ti.gname = ""
        return ti

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, src)
            for name in [*sorted(dirnames), *sorted(filenames)]:
                full = os.path.join(dirpath, name)
                arc = name if rel_dir == "." else f"{rel_dir}/{name}"
                ti = tar.gettarinfo(full, arcname=arc)
                if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE,
                                   tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
                                   tarfile.CHRTYPE, tarfile.BLKTYPE):
                    continue  # sockets and the like cannot go in an image
                ti = fix(ti)
                if ti.isreg():
                    with open(full, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)


def _gzip(src: Path, out: Path, level: int) -> None:
    with open(src, "rb") as fi, open(out, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz:
        shutil.copyfileobj(fi, gz, 1 << 20)


def _platform(platform: str) -> tuple[str, str, str]:
    os_name, _, arch = platform.partition("/") if isinstance(platform, str) else ("", "", "")
    arch, _, variant = arch.partition("/")
    if not os_name or not arch:
        raise ImageFormatError(f"bad platform {platform!r}: use os/arch like linux/amd64")
    return os_name, arch, variant


def image_from_layers(
    store: ImageStore,
    ref: str,
    layers: Sequence[Path | bytes],
    *,
    config: Mapping[str, Any] | None = None,
    platform: str = "linux/amd64",
    compresslevel: int = 6,
) -> Image:
    """Make an image from uncompressed layer tarballs (paths or bytes), bottom first.

    ``config`` holds OCI config fields (``Env``, ``Cmd``, ``Entrypoint``,
    ``WorkingDir``, ``User``, ...). Layers are gzip-compressed into the store.

    Example (paths work as well: ``[Path("base.tar"), Path("top.tar")]``)::

        >>> import io, tarfile
        >>> import rootfs
        >>> buf = io.BytesIO()
        >>> with tarfile.open(fileobj=buf, mode="w") as tar:
        ...     info = tarfile.TarInfo("etc/motd"); info.size = 3
        ...     tar.addfile(info, io.BytesIO(b"hi\\n"))
        >>> store = rootfs.ImageStore(Path("images"))
        >>> img = rootfs.image_from_layers(store, "local/t:1", [buf.getvalue()],
        ...                                config={"Cmd": ["/bin/sh"]})
        >>> img.ref, len(img.layers), img.cmd
        ('docker.io/local/t:1', 1, ['/bin/sh'])
    """
    r = parse_reference(ref)
    cfg = validate_config(config)
    os_name, arch, variant = _platform(platform)
    diff_ids: list[str] = []
    descs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=store.home / "tmp") as td:
        for i, layer in enumerate(layers):
            if isinstance(layer, bytes):
                tar_path = Path(td) / f"layer{i}.tar"
                tar_path.write_bytes(layer)
            else:
                tar_path = Path(layer)
            diff_ids.append(_hash_file(tar_path))
            gz_path = Path(td) / f"layer{i}.tar.gz"
            _gzip(tar_path, gz_path, compresslevel)
            digest = store.put_blob_file(gz_path)
            descs.append({"mediaType": OCI_LAYER_GZIP, "digest": digest,
                          "size": gz_path.stat().st_size})
    image_config: dict[str, Any] = {
        "architecture": arch,
        "os": os_name,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "rootfs.build"} for _ in diff_ids],
    }
    if variant:
        image_config["variant"] = variant
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_digest = store.put_blob(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": descs,
    }
    manifest_digest = store.put_blob(json.dumps(manifest, sort_keys=True).encode())
    return store.tag(r, manifest_digest)


def build_image(
    src_dir: str | os.PathLike[str],
    ref: str,
    store: ImageStore,
    config: Mapping[str, Any] | None = None,
    *,
    platform: str = "linux/amd64",
    owner: tuple[int, int] | None = (0, 0),
) -> Image:
    """Build a single-layer image of ``src_dir`` into ``store`` and tag it ``ref``.

    Example (a tiny image from Debian's busybox-static, no network needed)::

        import os, shutil
        from pathlib import Path
        import rootfs
        src = Path("/tmp/bb-root"); (src / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy("/bin/busybox", src / "bin/busybox")
        for tool in ("sh", "ls", "cat"):
            os.symlink("busybox", src / "bin" / tool)
        store = rootfs.ImageStore()
        img = rootfs.build_image(src, "local/busybox:latest", store,
                                 config={"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]})

    The same with a one-file tree:

        >>> import rootfs
        >>> Path("src/etc").mkdir(parents=True)
        >>> _ = Path("src/etc/motd").write_text("hi\\n")
        >>> store = rootfs.ImageStore(Path("images"))
        >>> img = rootfs.build_image(Path("src"), "local/app:1", store,
        ...                          config={"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]})
        >>> img.ref, img.env
        ('docker.io/local/app:1', ['PATH=/bin'])
    """
    parse_reference(ref)  # bad input is refused before the (slow) tar of the whole tree
    validate_config(config)
    _platform(platform)
    src = Path(src_dir)
    if not src.is_dir():
        raise RootfsError(f"image source {str(src)!r} is not a directory")
    with tempfile.TemporaryDirectory(dir=store.home / "tmp") as td:
        tar_path = Path(td) / "layer.tar"
        tar_directory(src, tar_path, owner=owner)
        return image_from_layers(store, ref, [tar_path], config=config, platform=platform)
