"""Rootfs patches: files, directories, symlinks and removals applied before boot.

Patches are applied in order. For OCI roots they go into the sandbox's overlay
*upper* tree (later baked into the upper disk) and are checked against the image
(the *lower* tree); for bind roots they modify the host directory in place.
Guest paths must be absolute and normalised; symlinks in parent paths are
resolved inside the root by :func:`rootfs._walk.walk_parents`, never by the host
kernel: absolute targets restart at the guest root, and a ``..`` that would climb
above the root is refused with :class:`~rootfs.errors.PatchError` (the same rule
layer unpacking uses).

Example::

    patches = [
        Patch.text("/etc/app.conf", "key = value\\n", mode=0o600),
        Patch.mkdir("/opt/app"),
        Patch.append("/etc/hosts", "203.0.113.7 db\\n"),
        Patch.remove("/etc/motd"),
    ]
    apply_patches(patches, upper=Path("upper"), lower=Path("image-root"))
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rootfs._walk import walk_parents
from rootfs.errors import PatchError

OPAQUE_XATTR = "trusted.overlay.opaque"
KINDS = ("text", "file", "append", "copy_file", "copy_dir", "symlink", "mkdir", "remove")


def _check_guest_path(kind: str, path: str) -> str:
    if not isinstance(path, str):
        raise PatchError(f"{kind} patch: path must be a string, got {type(path).__name__}")
    bad = (
        not path.startswith("/")
        or path == "/"
        or "\x00" in path
        or path.endswith("/")
        or any(c in ("", ".", "..") for c in path[1:].split("/"))
    )
    if bad:
        raise PatchError(
            f"{kind} patch: path {path!r} must be absolute and normalised "
            "(no '.', '..', '//', trailing '/'; not '/')"
        )
    return path


def _check_mode(kind: str, path: str, mode: int | None) -> int | None:
    if mode is None:
        return None
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise PatchError(f"{kind} patch for {path!r}: mode {mode!r} must be an int in 0..0o7777")
    return mode


@dataclass(frozen=True)
class Patch:
    """One rootfs modification; build with the constructors (seed-compatible arguments).

    ``path`` is the guest path acted on (the destination for ``copy_*``, the link
    for ``symlink``).

    Example::

        >>> from rootfs import Patch
        >>> p = Patch.text("/etc/motd", "hi\\n", mode=0o644)
        >>> p.kind, p.path
        ('text', '/etc/motd')
    """

    kind: str
    path: str
    content: bytes | None = None
    mode: int | None = None
    replace: bool = False
    src: str | None = None
    target: str | None = None

    @staticmethod
    def text(path: str, content: str, *, mode: int | None = None, replace: bool = False) -> Patch:
        """Write UTF-8 text to ``path`` (default mode 0644).

        Example::

            Patch.text("/etc/motd", "hello\\n")
        """
        _check_guest_path("text", path)
        if not isinstance(content, str):
            raise PatchError(f"text patch for {path!r}: content must be str (use Patch.file)")
        return Patch("text", path, content.encode(), _check_mode("text", path, mode), bool(replace))

    @staticmethod
    def file(path: str, content: bytes, *, mode: int | None = None, replace: bool = False) -> Patch:
        """Write raw bytes to ``path`` (default mode 0644).

        Example::

            Patch.file("/bin/tool", b"\\x7fELF...", mode=0o755)
        """
        _check_guest_path("file", path)
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise PatchError(f"file patch for {path!r}: content must be bytes")
        return Patch("file", path, bytes(content), _check_mode("file", path, mode), bool(replace))

    @staticmethod
    def append(path: str, content: str) -> Patch:
        """Append text to an existing regular file (a lower file is copied up, mode kept).

        Example::

            Patch.append("/etc/hosts", "203.0.113.9 api\\n")
        """
        _check_guest_path("append", path)
        if not isinstance(content, str):
            raise PatchError(f"append patch for {path!r}: content must be str")
        return Patch("append", path, content.encode())

    @staticmethod
    def copy_file(
        src: str | os.PathLike[str], dst: str, *, mode: int | None = None, replace: bool = False
    ) -> Patch:
        """Copy a host file to guest ``dst`` (mode: the source's unless given).

        Example::

            Patch.copy_file("/etc/ssl/certs/ca.pem", "/usr/local/share/ca.pem")
        """
        _check_guest_path("copy_file", dst)
        m = _check_mode("copy_file", dst, mode)
        return Patch("copy_file", dst, None, m, bool(replace), src=os.fspath(src))

    @staticmethod
    def copy_dir(src: str | os.PathLike[str], dst: str, *, replace: bool = False) -> Patch:
        """Copy a host directory tree to guest ``dst`` (modes kept; replace makes it exact).

        Example::

            Patch.copy_dir("./app", "/opt/app")
        """
        _check_guest_path("copy_dir", dst)
        return Patch("copy_dir", dst, None, None, bool(replace), src=os.fspath(src))

    @staticmethod
    def symlink(target: str, link: str, *, replace: bool = False) -> Patch:
        """Create symlink ``link`` -> ``target`` (target is stored verbatim).

        Example::

            Patch.symlink("/etc/app.conf", "/etc/app.link")
        """
        _check_guest_path("symlink", link)
        if not isinstance(target, str) or not target or "\x00" in target:
            raise PatchError(f"symlink patch for {link!r}: target {target!r} must be a non-empty str")
        return Patch("symlink", link, None, None, bool(replace), target=target)

    @staticmethod
    def mkdir(path: str, *, mode: int | None = None) -> Patch:
        """Create a directory (idempotent; parents created as needed; default 0755).

        Example::

            Patch.mkdir("/opt/app/data", mode=0o700)
        """
        _check_guest_path("mkdir", path)
        return Patch("mkdir", path, None, _check_mode("mkdir", path, mode))

    @staticmethod
    def remove(path: str) -> Patch:
        """Remove a file or directory (idempotent; a lower path gets a whiteout).

        Example::

            Patch.remove("/etc/motd")
        """
        _check_guest_path("remove", path)
        return Patch("remove", path)

    def to_dict(self) -> dict[str, Any]:
        """The seed's Hash form (``{"kind": "text", "path": ..., ...}``).

        Example::

            >>> Patch.remove("/etc/motd").to_dict()
            {'kind': 'remove', 'path': '/etc/motd'}
        """
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("copy_file", "copy_dir"):
            d.update(src=self.src, dst=self.path)
        elif self.kind == "symlink":
            d.update(target=self.target, link=self.path)
        else:
            d["path"] = self.path
        if self.kind in ("text", "append") and self.content is not None:
            d["content"] = self.content.decode()
        elif self.kind == "file":
            d["content"] = self.content
        if self.mode is not None:
            d["mode"] = self.mode
        if self.kind not in ("append", "mkdir", "remove"):
            d["replace"] = self.replace
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Patch:
        """Build a patch from the seed's Hash form (what :meth:`to_dict` returns).

        Example::

            Patch.from_dict({"kind": "mkdir", "path": "/opt/x"})
        """
        kind = d.get("kind")
        try:
            if kind == "text":
                return Patch.text(d["path"], d["content"], mode=d.get("mode"),
                                  replace=d.get("replace", False))
            if kind == "file":
                return Patch.file(d["path"], d["content"], mode=d.get("mode"),
                                  replace=d.get("replace", False))
            if kind == "append":
                return Patch.append(d["path"], d["content"])
            if kind == "copy_file":
                return Patch.copy_file(d["src"], d["dst"], mode=d.get("mode"),
                                       replace=d.get("replace", False))
            if kind == "copy_dir":
                return Patch.copy_dir(d["src"], d["dst"], replace=d.get("replace", False))
            if kind == "symlink":
                return Patch.symlink(d["target"], d["link"], replace=d.get("replace", False))
            if kind == "mkdir":
                return Patch.mkdir(d["path"], mode=d.get("mode"))
            if kind == "remove":
                return Patch.remove(d["path"])
        except KeyError as exc:
            raise PatchError(f"{kind} patch: missing field {exc.args[0]!r}") from None
        raise PatchError(f"unknown patch kind {kind!r}: use one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------- tree model


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _is_whiteout(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    if stat.S_ISREG(m):
        return "regular file"
    if stat.S_ISDIR(m):
        return "directory"
    if stat.S_ISLNK(m):
        return "symlink"
    if stat.S_ISCHR(m):
        return "character device"
    if stat.S_ISBLK(m):
        return "block device"
    if stat.S_ISFIFO(m):
        return "fifo"
    return "socket"


@dataclass
class _Node:
    layer: str  # "upper" | "lower"
    host: str
    st: os.stat_result


class PatchTarget:
    """A root to patch: an overlay (``lower`` read-only + ``upper``) or a plain directory.

    With ``lower=None`` the tree is patched in place (bind roots): removals
    delete, nothing is whited out.

    Example::

        PatchTarget(Path("upper"), lower=Path("image-root")).apply(patches)
    """

    def __init__(self, upper: Path, lower: Path | None = None) -> None:
        self.upper = os.fspath(upper)
        self.lower = os.fspath(lower) if lower is not None else None
        self.whiteouts = 0

    # -- lookup in the merged view ------------------------------------------
    def _lookup(self, comps: list[str]) -> _Node | None:
        """Merged-view node at canonical (symlink-free parent) ``comps``."""
        lower_visible = self.lower is not None
        for i in range(len(comps)):
            up = os.path.join(self.upper, *comps[: i + 1])
            ust = _lstat(up)
            if _is_whiteout(ust) and self.lower is not None:
                return None
            lst = None
            if lower_visible and self.lower is not None:
                lst = _lstat(os.path.join(self.lower, *comps[: i + 1]))
            last = i == len(comps) - 1
            if last:
                if ust is not None:
                    return _Node("upper", up, ust)
                if lst is not None:
                    return _Node("lower", os.path.join(self.lower or "", *comps), lst)
                return None
            if ust is not None:
                if not stat.S_ISDIR(ust.st_mode):
                    return None
                if lst is None or not stat.S_ISDIR(lst.st_mode) or _is_opaque(up):
                    lower_visible = False
            elif lst is None or not stat.S_ISDIR(lst.st_mode):
                return None
        return None

    def _resolve_parent(self, patch: Patch, comps: list[str]) -> list[str]:
        """Canonical components of the parent of ``comps`` (see :mod:`rootfs._walk`)."""

        def probe(c: list[str]) -> tuple[str, str]:
            node = self._lookup(c)
            if node is None:
                return "missing", ""
            if stat.S_ISDIR(node.st.st_mode):
                return "dir", ""
            if stat.S_ISLNK(node.st.st_mode):
                return "link", os.readlink(node.host)
            return "other", _kind(node.st)

        def settle(c: list[str], kind: str, info: str) -> None:
            # Below a missing directory everything is missing too: keep going (the
            # directories are made later); anything else cannot be a parent.
            if kind != "missing":
                raise PatchError(f"{patch.kind} patch for {patch.path!r}: parent "
                                 f"{'/' + '/'.join(c)!r} is a {info}, not a directory")

        def fail(reason: str) -> PatchError:
            return PatchError(f"{patch.kind} patch for {patch.path!r}: {reason}")

        return walk_parents(comps[:-1], probe, settle, fail)

    def _ensure_dirs(self, comps: list[str], mode: int = 0o755) -> None:
        """Make ``comps`` a directory chain in the upper tree (copying up lower dirs)."""
        for i in range(len(comps)):
            up = os.path.join(self.upper, *comps[: i + 1])
            ust = _lstat(up)
            if ust is not None and stat.S_ISDIR(ust.st_mode):
                continue
            lst = None
            if self.lower is not None:
                lst = _lstat(os.path.join(self.lower, *comps[: i + 1]))
            opaque = False
            if ust is not None:  # a whiteout (or a non-dir in bind mode): replace it
                os.unlink(up)
                opaque = self.lower is not None and lst is not None
            visible = self._lookup(comps[: i + 1]) if not opaque else None
            os.mkdir(up, mode)
            if lst is not None and stat.S_ISDIR(lst.st_mode) and not opaque and visible is not None:
                os.chmod(up, stat.S_IMODE(lst.st_mode))
                if os.geteuid() == 0:
                    os.lchown(up, lst.st_uid, lst.st_gid)
            else:
                os.chmod(up, mode)
            if opaque or (lst is not None and not stat.S_ISDIR(lst.st_mode)):
                self._set_opaque(up)

    def _set_opaque(self, path: str) -> None:
        try:
            os.setxattr(path, OPAQUE_XATTR, b"y", follow_symlinks=False)
        except OSError as exc:
            raise PatchError(
                f"cannot mark {path!r} overlay-opaque ({exc.strerror}); needs root"
            ) from None

    def _whiteout(self, patch: Patch, host: str) -> None:
        try:
            os.mknod(host, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        except PermissionError:
            raise PatchError(
                f"remove patch for {patch.path!r}: creating an overlay whiteout needs root"
            ) from None
        self.whiteouts += 1

    def _drop_upper(self, host: str) -> None:
        st = _lstat(host)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(host)
        else:
            os.unlink(host)

    def _check_replace(self, patch: Patch, node: _Node | None) -> None:
        if node is None or patch.replace:
            return
        if node.layer == "lower":
            raise PatchError(
                f"{patch.kind} patch: path exists in image layer: {patch.path!r} "
                "(set replace to allow)"
            )
        raise PatchError(
            f"{patch.kind} patch: path already exists in rootfs: {patch.path!r} "
            "(set replace to allow)"
        )

    # -- apply --------------------------------------------------------------
    def apply(self, patches: Iterable[Patch]) -> None:
        """Apply ``patches`` in order; raise :class:`PatchError` naming the first bad one.

        Example::

            PatchTarget(Path("upper"), Path("lower")).apply([Patch.mkdir("/data")])
        """
        for patch in patches:
            if not isinstance(patch, Patch):
                raise PatchError(f"not a Patch: {patch!r:.80} (build with rootfs.Patch.*)")
            try:
                self._apply_one(patch)
            except PatchError:
                raise
            except OSError as exc:
                raise PatchError(
                    f"{patch.kind} patch for {patch.path!r} failed: {exc.strerror or exc}"
                ) from None

    def _apply_one(self, patch: Patch) -> None:
        comps = patch.path[1:].split("/")
        parent = self._resolve_parent(patch, comps)
        canon = [*parent, comps[-1]]
        node = self._lookup(canon)
        host = os.path.join(self.upper, *canon)
        kind = patch.kind
        if kind == "mkdir":
            if node is not None:
                if stat.S_ISDIR(node.st.st_mode):
                    return
                raise PatchError(
                    f"mkdir patch: cannot create directory at {patch.path!r}: "
                    "path exists and is not a directory"
                )
            self._ensure_dirs(parent)
            mode = 0o755 if patch.mode is None else patch.mode
            self._ensure_dirs(canon, mode)
            os.chmod(host, mode)
            return
        if kind == "remove":
            if node is None:
                return
            self._drop_upper(host)
            if self.lower is not None and self._lookup(canon) is not None:
                self._ensure_dirs(parent)
                self._whiteout(patch, host)
            return
        if kind == "append":
            self._append(patch, node, parent, host)
            return
        self._check_replace(patch, node)
        self._ensure_dirs(parent)
        self._drop_upper(host)
        if kind in ("text", "file"):
            assert patch.content is not None
            self._write(host, patch.content, 0o644 if patch.mode is None else patch.mode)
        elif kind == "copy_file":
            self._copy_file(patch, host)
        elif kind == "copy_dir":
            shadows = node is not None or (
                self.lower is not None and _lstat(os.path.join(self.lower, *canon)) is not None
            )
            self._copy_dir(patch, host, shadows)
        elif kind == "symlink":
            assert patch.target is not None
            os.symlink(patch.target, host)

    def _write(self, host: str, data: bytes, mode: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(host, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(host, mode)

    def _copy_file(self, patch: Patch, host: str) -> None:
        assert patch.src is not None
        try:
            sst = os.stat(patch.src)
        except OSError as exc:
            raise PatchError(
                f"copy_file patch for {patch.path!r}: source {patch.src!r}: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(sst.st_mode):
            raise PatchError(
                f"copy_file patch for {patch.path!r}: source {patch.src!r} is not a regular file"
            )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(patch.src, "rb") as src, os.fdopen(os.open(host, flags, 0o600), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(host, stat.S_IMODE(sst.st_mode) if patch.mode is None else patch.mode)

    def _copy_dir(self, patch: Patch, host: str, shadows: bool) -> None:
        assert patch.src is not None
        if not os.path.isdir(patch.src):
            raise PatchError(
                f"copy_dir patch for {patch.path!r}: source {patch.src!r} is not a directory"
            )
        for dirpath, dirnames, filenames in os.walk(patch.src):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
                        or stat.S_ISLNK(st.st_mode)):
                    raise PatchError(
                        f"copy_dir patch for {patch.path!r}: source entry "
                        f"{os.path.join(dirpath, name)!r} is a {_kind(st)} (only files, "
                        "directories and symlinks are copied)"
                    )
        shutil.copytree(patch.src, host, symlinks=True)
        if self.lower is not None and shadows:
            # Replacing (or re-creating after a remove) something in the image: the copied
            # tree must be exactly the source, so lower entries below it stay hidden.
            self._set_opaque(host)

    def _append(self, patch: Patch, node: _Node | None, parent: list[str], host: str) -> None:
        assert patch.content is not None
        if node is None:
            raise PatchError(f"append patch: cannot append to {patch.path!r}: "
                             "file not found in rootfs")
        if not stat.S_ISREG(node.st.st_mode):
            raise PatchError(f"append patch for {patch.path!r}: target is not a regular file "
                             f"({_kind(node.st)})")
        if node.layer == "upper":
            fd = os.open(host, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "ab") as f:
                f.write(patch.content)
            return
        # Copy-up from the lower tree, keeping mode, ownership and xattrs.
        self._ensure_dirs(parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(node.host, "rb") as src, os.fdopen(os.open(host, flags, 0o600), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.write(patch.content)
        if os.geteuid() == 0:
            os.lchown(host, node.st.st_uid, node.st.st_gid)
        os.chmod(host, stat.S_IMODE(node.st.st_mode))
        try:
            names = os.listxattr(node.host, follow_symlinks=False)
        except OSError:
            names = []
        for name in names:
            try:
                os.setxattr(host, name, os.getxattr(node.host, name, follow_symlinks=False))
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise


def apply_patches(patches: Iterable[Patch], *, upper: Path, lower: Path | None = None) -> int:
    """Apply ``patches`` to an overlay upper tree (or a plain dir); return whiteouts made.

    Example::

        >>> from rootfs import Patch, apply_patches
        >>> Path("upper").mkdir()
        >>> apply_patches([Patch.mkdir("/data")], upper=Path("upper"))   # no whiteouts
        0
        >>> Path("upper/data").is_dir()
        True
    """
    target = PatchTarget(upper, lower)
    target.apply(patches)
    return target.whiteouts
