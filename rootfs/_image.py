"""The image model: manifests, configs and layer descriptors as stored on disk.

Example::

    img = store.pull("127.0.0.1:5000/busybox:latest", insecure=True)
    print(img.digest, img.id, [l.digest for l in img.layers], img.cmd)
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from rootfs._reference import validate_digest
from rootfs.errors import ImageFormatError, ImageNotFoundError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
LAYER_TYPES = (
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    DOCKER_LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (media type, digest, size).

    Example::

        >>> from rootfs import Descriptor
        >>> d = Descriptor(OCI_LAYER_GZIP, "sha256:" + "0" * 64, 123)
        >>> d.to_json()["size"], Descriptor.from_json(d.to_json(), "layer") == d
        (123, True)
    """

    media_type: str
    digest: str
    size: int
    platform: dict[str, str] | None = None

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Descriptor:
        """Parse and validate a descriptor object (``what`` names it in errors).

        Example::

            Descriptor.from_json(manifest["config"], "config")
        """
        if not isinstance(obj, dict):
            raise ImageFormatError(f"{what}: descriptor must be an object, got {obj!r:.80}")
        mt, dg, sz = obj.get("mediaType", ""), obj.get("digest"), obj.get("size")
        if not isinstance(dg, str) or not isinstance(sz, int) or sz < 0 or not isinstance(mt, str):
            raise ImageFormatError(f"{what}: bad descriptor {obj!r:.200}")
        validate_digest(dg)
        plat = obj.get("platform")
        platform = {str(k): str(v) for k, v in plat.items()} if isinstance(plat, dict) else None
        return cls(mt, dg, sz, platform)

    def to_json(self) -> dict[str, Any]:
        """The JSON object form.

        Example::

            json.dumps(desc.to_json())
        """
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object or raise :class:`ImageFormatError` naming ``what``.

    Example::

        >>> parse_json(b'{"a": 1}', "test")
        {'a': 1}
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageFormatError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ImageFormatError(f"{what} must be a JSON object")
    return obj


def parse_manifest(data: bytes, what: str = "manifest") -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """Return (config descriptor, layer descriptors) of an image manifest.

    Example::

        config, layers = parse_manifest(blob_bytes)
    """
    m = parse_json(data, what)
    if m.get("schemaVersion") != 2:
        raise ImageFormatError(f"{what}: only schemaVersion 2 manifests are supported")
    mt = m.get("mediaType", OCI_MANIFEST)
    if mt in INDEX_TYPES or "manifests" in m:
        raise ImageFormatError(f"{what}: is an index, not an image manifest")
    config = Descriptor.from_json(m.get("config"), f"{what} config")
    layers_raw = m.get("layers")
    if not isinstance(layers_raw, list):
        raise ImageFormatError(f"{what}: 'layers' must be a list")
    layers = tuple(Descriptor.from_json(x, f"{what} layer {i}") for i, x in enumerate(layers_raw))
    for layer in layers:
        if layer.media_type and layer.media_type not in LAYER_TYPES:
            raise ImageFormatError(f"{what}: unsupported layer media type {layer.media_type!r}")
    return config, layers


@dataclass(frozen=True)
class Image:
    """A resolved single-platform image held in an :class:`~rootfs._store.ImageStore`.

    ``digest`` is the manifest digest; ``id`` the config digest (which fixes the
    content: it lists every layer's uncompressed diff_id).

    Example::

        >>> from pathlib import Path
        >>> import rootfs
        >>> Path("src/etc").mkdir(parents=True)
        >>> _ = Path("src/etc/motd").write_text("hi\\n")
        >>> store = rootfs.ImageStore(Path("images"))
        >>> _ = rootfs.build_image(Path("src"), "local/app:1", store, config={"Cmd": ["/bin/sh"]})
        >>> img = store.get("local/app:1")
        >>> img.ref, img.cmd, len(img.layers), img.id.startswith("sha256:")
        ('docker.io/local/app:1', ['/bin/sh'], 1, True)
    """

    ref: str
    digest: str
    config_digest: str
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    config: dict[str, Any] = field(compare=False, hash=False)

    @property
    def id(self) -> str:
        """The config digest (content identity of the filesystem + config); ``img.id``."""
        return self.config_digest

    @property
    def platform(self) -> str:
        """``os/architecture`` from the config."""
        return f"{self.config.get('os', '?')}/{self.config.get('architecture', '?')}"

    def _cfg(self) -> dict[str, Any]:
        c = self.config.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def env(self) -> list[str]:
        """``Env`` of the image config (``KEY=VALUE`` strings)."""
        return list(self._cfg().get("Env") or [])

    @property
    def cmd(self) -> list[str]:
        """``Cmd`` of the image config."""
        return list(self._cfg().get("Cmd") or [])

    @property
    def entrypoint(self) -> list[str]:
        """``Entrypoint`` of the image config."""
        return list(self._cfg().get("Entrypoint") or [])

    @property
    def working_dir(self) -> str:
        """``WorkingDir`` of the image config (``/`` when unset)."""
        return str(self._cfg().get("WorkingDir") or "/")

    @property
    def user(self) -> str:
        """``User`` of the image config (empty = root)."""
        return str(self._cfg().get("User") or "")


def parse_config(data: bytes, n_layers: int, what: str = "image config") -> tuple[str, ...]:
    """Validate an image config against the manifest; return its diff_ids.

    Example::

        diff_ids = parse_config(config_bytes, len(layers))
    """
    cfg = parse_json(data, what)
    rootfs = cfg.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise ImageFormatError(f"{what}: missing rootfs.diff_ids")
    diff_ids = tuple(str(d) for d in rootfs["diff_ids"])
    for d in diff_ids:
        validate_digest(d)
    if len(diff_ids) != n_layers:
        raise ImageFormatError(
            f"{what}: {len(diff_ids)} diff_ids but the manifest lists {n_layers} layers"
        )
    return diff_ids


def host_platform() -> str:
    """``linux/amd64`` or ``linux/arm64`` for this machine (amd64 if unknown).

    Example::

        >>> host_platform() in ("linux/amd64", "linux/arm64")
        True
    """
    m = _platform.machine().lower()
    return "linux/arm64" if m in ("aarch64", "arm64") else "linux/amd64"


def choose_platform(index: dict[str, Any], plat: str, what: str) -> Descriptor:
    """The manifest descriptor of ``index`` (an OCI index / Docker list) for ``plat``.

    ``plat`` is ``os/arch[/variant]``; ``what`` names the index in errors. No match
    raises :class:`~rootfs.errors.ImageNotFoundError` listing what is available.

    Example::

        >>> idx = {"manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:" + "a" * 64,
        ...        "size": 1, "platform": {"os": "linux", "architecture": "arm64"}}]}
        >>> choose_platform(idx, "linux/arm64", "demo").size
        1
        >>> choose_platform(idx, "linux/amd64", "demo")
        Traceback (most recent call last):
        ...
        rootfs.errors.ImageNotFoundError: demo has no linux/amd64 image (available: linux/arm64)
    """
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
