"""Docker-style image references: ``[registry[:port]/]repository[:tag][@digest]``.

Example::

    >>> ref = parse_reference("alpine")
    >>> (ref.registry, ref.repository, ref.tag)
    ('docker.io', 'library/alpine', 'latest')
    >>> str(parse_reference("localhost:5000/team/app@sha256:" + "a" * 64))[:31]
    'localhost:5000/team/app@sha256:'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rootfs.errors import DigestError, InvalidReferenceError

DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::(?P<port>[0-9]+))?\Z"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z", re.ASCII)
_DIGEST_HEX = {"sha256": 64, "sha512": 128}
_NAME_MAX = 255


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 hex>`` (or sha512), else raise.

    Example::

        >>> validate_digest("sha256:" + "0" * 64)[:7]
        'sha256:'
    """
    algo, sep, hexpart = digest.partition(":")
    want = _DIGEST_HEX.get(algo)
    if not sep or want is None:
        raise DigestError(f"bad digest {digest!r}: algorithm must be one of sha256, sha512")
    if len(hexpart) != want or not all(c in "0123456789abcdef" for c in hexpart):
        raise DigestError(
            f"bad digest {digest!r}: {algo} needs {want} lowercase hex characters"
        )
    return digest


@dataclass(frozen=True)
class Reference:
    """A parsed image reference.

    Example::

        >>> Reference("ghcr.io", "org/tool", "v1").name
        'ghcr.io/org/tool'
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` (the fully qualified name, no tag or digest).

        Example::

            >>> parse_reference("alpine:3").name
            'docker.io/library/alpine'
        """
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """Host[:port] to talk the registry API to (Docker Hub maps to registry-1).

        Example::

            >>> parse_reference("alpine").api_host
            'registry-1.docker.io'
        """
        return DOCKER_HUB_API if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def selector(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag.

        Example::

            >>> parse_reference("alpine:3.19").selector
            '3.19'
        """
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        """A copy pinned to ``digest`` (tag kept for display).

        Example::

            >>> parse_reference("a:1").with_digest("sha256:" + "0" * 64).tag
            '1'
        """
        return Reference(self.registry, self.repository, self.tag, validate_digest(digest))

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse a Docker-style reference; errors name the bad part.

    Defaults: registry ``docker.io``, ``library/`` for single-component Docker Hub
    names, tag ``latest`` when neither tag nor digest is given.

    Example::

        >>> parse_reference("127.0.0.1:5000/busybox:1.36").registry
        '127.0.0.1:5000'
    """
    if not isinstance(text, str):
        raise InvalidReferenceError(f"image reference must be a string, got {type(text).__name__}")
    if not text or text != text.strip():
        raise InvalidReferenceError(f"bad image reference {text!r}: empty or surrounding spaces")
    rest, at, digest = text.partition("@")
    digest_v: str | None = None
    if at:
        try:
            digest_v = validate_digest(digest)
        except DigestError as exc:
            raise InvalidReferenceError(f"bad digest in image reference {text!r}: {exc}") from None
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReferenceError(
                f"bad tag {tag!r} in image reference {text!r}: "
                "use letters, digits, '_', '.', '-' (max 128, not starting with '.' or '-')"
            )
    if not rest:
        raise InvalidReferenceError(f"bad image reference {text!r}: missing repository name")
    parts = rest.split("/")
    registry = DEFAULT_REGISTRY
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry = parts.pop(0)
        m = _HOST.match(registry)
        if m is None:
            raise InvalidReferenceError(
                f"bad registry host {registry!r} in image reference {text!r}"
            )
        port = m.group("port")
        if port is not None and not 0 < int(port) < 65536:
            raise InvalidReferenceError(
                f"bad registry port {port!r} in image reference {text!r}: must be 1..65535"
            )
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
    for comp in parts:
        if not _COMPONENT.match(comp):
            raise InvalidReferenceError(
                f"bad repository component {comp!r} in image reference {text!r}: "
                "use lowercase letters and digits separated by '.', '_', '__' or '-'"
            )
    repository = "/".join(parts)
    if registry == DEFAULT_REGISTRY and len(parts) == 1:
        repository = f"library/{repository}"
    if len(registry) + 1 + len(repository) > _NAME_MAX:
        raise InvalidReferenceError(
            f"bad image reference {text!r}: name longer than {_NAME_MAX} characters"
        )
    if tag is None and digest_v is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest_v)
