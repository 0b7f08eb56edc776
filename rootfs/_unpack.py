"""Safe application of OCI layer tarballs onto a directory.

Every entry is checked before anything is written: no ``..`` components, no
absolute names, parents are resolved component by component inside the destination
by :func:`rootfs._walk.walk_parents` (the same rule patches use: an absolute symlink
target restarts at the destination's root, a ``..`` climbing above it is refused;
the host kernel never follows a layer's symlink), hardlinks
must point at an existing non-directory inside the destination, device nodes are
refused unless allowed, and the total size and entry count are capped. OCI
whiteouts (``.wh.NAME``) and opaque markers (``.wh..wh..opq``) remove what lower
layers put there. A violation raises :class:`~rootfs.errors.UnsafeLayerError`
naming the entry.

Why our own extractor rather than umoci (which the design names) or ``tarfile``'s
``extractall``: it is about twice as fast as ``umoci raw unpack`` on the same layers
(``python -m benchmarks.rootfs``: ``unpack_ratio``), it refuses hostile layers with one
rule shared with patches instead of clamping them, and it needs no root (ownership is
kept only as root). Unpacking is a seam: :class:`NativeUnpacker` (this module) is the
default :class:`~rootfs.protocols.Unpacker`; :class:`~rootfs._umoci.UmociUnpacker`
runs umoci per layer and stays the reference the tests and benchmarks compare with.

Example::

    state = UnpackState()
    with open("layer.tar.gz", "rb") as f:
        diff_id = apply_layer(f, Path("/tmp/root"), state=state)
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import stat
import sys
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, Literal, cast

import zstandard

from rootfs._walk import walk_parents
from rootfs.errors import DigestError, ImageFormatError, UnsafeLayerError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class UnpackLimits:
    """Caps for one unpack (all layers together).

    Example::

        >>> from rootfs import UnpackLimits
        >>> UnpackLimits(max_bytes=64 << 20, max_files=10_000).max_files
        10000
    """

    max_bytes: int = 8 << 30
    max_files: int = 1_000_000
    allow_devices: bool = False
    same_owner: bool | None = None  # None: keep ownership only when running as root

    def keep_owner(self) -> bool:
        """Whether ownership from the layer is applied (default: only as root).

        Example::

            UnpackLimits(same_owner=False).keep_owner()  # False
        """
        return os.geteuid() == 0 if self.same_owner is None else self.same_owner


@dataclass
class UnpackState:
    """Running totals across the layers of one unpack, plus non-fatal notes.

    Example::

        >>> from rootfs import UnpackLimits, UnpackState
        >>> state = UnpackState(UnpackLimits(max_files=100))
        >>> state.total_files, state.limits.max_files
        (0, 100)
    """

    limits: UnpackLimits = field(default_factory=UnpackLimits)
    total_bytes: int = 0
    total_files: int = 0
    notes: list[str] = field(default_factory=list)


class _HashingReader:
    """File-like wrapper that hashes and counts (and may copy) every byte read through it."""

    def __init__(self, raw: IO[bytes], copy_to: IO[bytes] | None = None) -> None:
        self.raw = raw
        self.copy_to = copy_to
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.count += len(data)
        if self.copy_to is not None:
            self.copy_to.write(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


class _ZstdFrames:
    """Follows the frame and block headers of the zstd bytes read through it.

    zstandard's stream reader ends quietly when the input stops inside a frame (the
    ``zstd`` tool fails): :meth:`complete` tells the two apart, as gzip's EOFError does.
    """

    _ZSTD_MAGIC = 0xFD2FB528

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.state = "magic"
        self.need = 4  # bytes of the header field being read
        self.buf = b""
        self.skip = 0  # bytes of block payload (or optional header fields) to pass over
        self.checksum = False

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        i, size = 0, len(data)
        while i < size:
            if self.skip:
                take = min(self.skip, size - i)
                self.skip -= take
                i += take
                continue
            take = min(self.need - len(self.buf), size - i)
            self.buf += data[i:i + take]
            i += take
            if len(self.buf) == self.need:
                field, self.buf = self.buf, b""
                self._header(int.from_bytes(field, "little"))
        return data

    def _header(self, v: int) -> None:
        if self.state == "magic":
            if v == self._ZSTD_MAGIC:
                self.state, self.need = "descriptor", 1
            elif v >> 4 == 0x184D2A5:  # a skippable frame: its size comes next
                self.state, self.need = "skippable", 4
            else:
                raise ImageFormatError(f"zstd layer has a bad frame magic 0x{v:08x}")
        elif self.state == "skippable":
            self.state, self.need, self.skip = "magic", 4, v
        elif self.state == "descriptor":
            single = (v >> 5) & 1
            self.checksum = bool((v >> 2) & 1)
            self.skip = (0 if single else 1) + (0, 1, 2, 4)[v & 3] \
                + ((1 if single else 0), 2, 4, 8)[v >> 6]
            self.state, self.need = "block", 3
        else:  # a block header: last flag, type, size
            btype, bsize = (v >> 1) & 3, v >> 3
            if btype == 3:
                raise ImageFormatError("zstd layer has a reserved block type")
            self.skip = 1 if btype == 1 else bsize
            if v & 1:
                self.skip += 4 if self.checksum else 0
                self.state, self.need = "magic", 4

    def complete(self) -> bool:
        """Whether the bytes read so far end exactly at the end of a frame."""
        return self.state == "magic" and not self.buf and not self.skip


Compression = Literal["gzip", "zstd", "tar"]


def layer_compression(head: bytes) -> Compression:
    """How a layer blob starting with ``head`` (its first 4 bytes) is compressed, by magic.

    Example::

        >>> from rootfs._unpack import layer_compression
        >>> layer_compression(b"\\x1f\\x8b\\x08\\x00"), layer_compression(b"usr/")
        ('gzip', 'tar')
    """
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "tar"


@contextmanager
def decompressed(fileobj: BinaryIO) -> Iterator[IO[bytes]]:
    """Yield an uncompressed view of a layer blob (gzip, zstd or plain tar, by magic).

    Example::

        with open(blob, "rb") as f, decompressed(f) as tar_stream:
            ...
    """
    head = fileobj.read(4)
    fileobj.seek(-len(head), os.SEEK_CUR)
    kind = layer_compression(head)
    if kind == "gzip":
        with gzip.GzipFile(fileobj=fileobj, mode="rb") as gz:
            yield cast(IO[bytes], gz)
    elif kind == "zstd":
        # In-process and streaming: the decompressor's window is capped (zstd's default
        # 128 MiB limit), so a hostile frame cannot make us allocate more.
        frames = _ZstdFrames(fileobj)
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(cast(IO[bytes], frames), read_size=_CHUNK, read_across_frames=True,
                                closefd=False) as zr:
            yield cast(IO[bytes], zr)
            if sys.exc_info()[0] is None and not frames.complete():
                raise ImageFormatError("zstd layer is truncated (it ends inside a frame)")
    else:
        yield fileobj


def _split(name: str, what: str, entry: str | None = None) -> list[str]:
    """Normalise a tar member name into safe relative components."""
    who = name if entry is None else entry
    if "\x00" in name:
        raise UnsafeLayerError(who, f"{what} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeLayerError(who, f"{what} {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayerError(who, f"{what} {name!r} contains a '..' component")
    return parts


class _MissingParent(UnsafeLayerError):
    """A parent is absent or not a directory (only raised when not creating)."""


def _resolve_parent(root: str, parts: list[str], entry: str, create: bool) -> str:
    """Host path of the directory ``parts`` under ``root`` (see :mod:`rootfs._walk`).

    Missing directories are created (mode 0755) and a non-directory in the way is
    replaced by one when ``create``; otherwise both raise :class:`_MissingParent`.
    """

    def probe(c: list[str]) -> tuple[str, str]:
        path = os.path.join(root, *c)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return "missing", ""
        if stat.S_ISDIR(st.st_mode):
            return "dir", ""
        if stat.S_ISLNK(st.st_mode):
            return "link", os.readlink(path)
        return "other", "not a directory"

    def settle(c: list[str], kind: str, info: str) -> None:
        path = os.path.join(root, *c)
        if not create:
            raise _MissingParent(entry, f"parent {'/'.join(c)!r} is "
                                 f"{'missing' if kind == 'missing' else info}")
        if kind != "missing":  # a layer replacing a file with a directory: the file goes
            os.unlink(path)
        os.mkdir(path, 0o755)

    def fail(reason: str) -> UnsafeLayerError:
        return UnsafeLayerError(entry, reason)

    return os.path.join(root, *walk_parents(parts, probe, settle, fail))


def remove_node(path: str, *, ignore_errors: bool = False) -> None:
    """Remove ``path`` (a directory with its contents; never following a symlink), if there.

    ``ignore_errors`` applies to a directory's contents, as in :func:`shutil.rmtree`.

    Example::

        remove_node(os.path.join(root, "etc"))
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        os.unlink(path)


def _apply_meta(path: str, member: tarfile.TarInfo, state: UnpackState) -> None:
    is_link = member.issym()
    if state.limits.keep_owner():
        os.lchown(path, member.uid, member.gid)
    if not is_link:
        mode = member.mode & 0o7777
        if member.isdir() and os.geteuid() != 0:
            mode |= 0o700  # without root we must still be able to fill the directory
        os.chmod(path, mode)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
            raw = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(path, name, raw, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
                state.notes.append(f"xattr {name} on {member.name} not kept: {exc.strerror}")
    if not member.isdir():
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def apply_layer(
    fileobj: BinaryIO,
    dest: Path,
    *,
    state: UnpackState | None = None,
    expected_diff_id: str | None = None,
) -> str:
    """Apply one layer blob (compressed or not) onto ``dest``; return its diff_id.

    Raises :class:`UnsafeLayerError` for a hostile entry and
    :class:`~rootfs.errors.DigestError` when ``expected_diff_id`` does not match.

    Example (``expected_diff_id=image.diff_ids[i]`` checks the uncompressed digest)::

        >>> import io, tarfile
        >>> buf = io.BytesIO()
        >>> with tarfile.open(fileobj=buf, mode="w") as tar:
        ...     info = tarfile.TarInfo("etc/motd"); info.size = 3
        ...     tar.addfile(info, io.BytesIO(b"hi\\n"))
        >>> from rootfs import apply_layer
        >>> _ = buf.seek(0)
        >>> apply_layer(buf, Path("rootfs"))[:7]
        'sha256:'
        >>> sorted(p.name for p in Path("rootfs").rglob("*"))
        ['etc', 'motd']
    """
    st = state if state is not None else UnpackState()
    root = os.fspath(dest)
    os.makedirs(root, exist_ok=True)
    with _reading(fileobj, f"layer could not be applied to {root!r}") as reader:
        _apply_tar(reader, root, st)
    diff_id = "sha256:" + reader.sha.hexdigest()
    check_diff_id(diff_id, expected_diff_id)
    return diff_id


def check_diff_id(diff_id: str, expected: str | None) -> None:
    """Raise :class:`~rootfs.errors.DigestError` unless ``diff_id`` is ``expected`` (or that is None).

    Example::

        check_diff_id(diff_id, image.diff_ids[i])
    """
    if expected is not None and diff_id != expected:
        raise DigestError(f"layer diff_id mismatch: expected {expected}, got {diff_id}")


@contextmanager
def _reading(fileobj: BinaryIO, failure: str,
             copy_to: IO[bytes] | None = None) -> Iterator[_HashingReader]:
    """Yield a hashing reader over the uncompressed layer; drain it after the body.

    Damage to the compressed stream, and any OSError (prefixed by ``failure``), raise
    :class:`~rootfs.errors.ImageFormatError`.
    """
    try:
        with decompressed(fileobj) as raw:
            reader = _HashingReader(raw, copy_to)
            yield reader
            reader.drain()
    except (gzip.BadGzipFile, zlib.error, zstandard.ZstdError, EOFError) as exc:
        raise ImageFormatError(f"corrupt compressed layer: {exc}") from None
    except OSError as exc:
        raise ImageFormatError(f"{failure}: {exc}") from None


@dataclass(frozen=True)
class LayerEntry:
    """One layer entry that passed :func:`check_entry`.

    ``parts``: its safe path components (empty for the root); ``kind``: ``root``,
    ``node`` (a file, directory, link, fifo or allowed device), ``whiteout`` or
    ``opaque`` (``.wh..wh..opq``).

    Example::

        entry = check_entry(member, state)
        if entry.kind in ("whiteout", "opaque"): apply_whiteout(root, entry, created)
    """

    name: str
    parts: tuple[str, ...]
    kind: str

    @property
    def rel(self) -> str:
        """``parts`` joined with ``/`` (``""`` for the root)."""
        return "/".join(self.parts)


def check_entry(member: tarfile.TarInfo, state: UnpackState) -> LayerEntry:
    """The rules for one tar entry that need no tree; charges ``state``'s limits.

    Refuses (with :class:`UnsafeLayerError` naming the entry) more than ``max_files``
    entries, negative sizes, more than ``max_bytes`` in all, NUL bytes, absolute names
    and ``..`` components (in names and hardlink targets), a non-directory root, a
    whiteout naming nothing valid, a hardlink to the root, devices unless allowed and
    unknown entry types. Both unpackers run it on every entry before writing it.

    Example::

        >>> ti = tarfile.TarInfo("etc/../../x")
        >>> check_entry(ti, UnpackState())
        Traceback (most recent call last):
        ...
        rootfs.errors.UnsafeLayerError: unsafe layer entry 'etc/../../x': name 'etc/../../x' contains a '..' component
    """
    limits = state.limits
    name = member.name
    state.total_files += 1
    if state.total_files > limits.max_files:
        raise UnsafeLayerError(name, f"more than {limits.max_files} entries (max_files)")
    if member.isreg():
        if member.size < 0:
            raise UnsafeLayerError(name, "negative size")
        if state.total_bytes + member.size > limits.max_bytes:
            raise UnsafeLayerError(
                name,
                f"claims {member.size} bytes; total would exceed max_bytes={limits.max_bytes}",
            )
        state.total_bytes += member.size  # tarfile yields exactly this many bytes, or fails
    parts = tuple(_split(name, "name"))
    if not parts:
        if member.isdir():
            return LayerEntry(name, parts, "root")
        raise UnsafeLayerError(name, "a non-directory entry for the root itself")
    base = parts[-1]
    if base == OPAQUE_MARKER:
        return LayerEntry(name, parts, "opaque")
    if base.startswith(WHITEOUT_PREFIX):
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", "..") or target.startswith(WHITEOUT_PREFIX):
            raise UnsafeLayerError(name, "whiteout names no valid entry")
        return LayerEntry(name, parts, "whiteout")
    if member.islnk():
        if not _split(member.linkname, "hardlink target", name):
            raise UnsafeLayerError(name, "hardlink to the root directory")
    elif member.ischr() or member.isblk():
        if not limits.allow_devices:
            kind = "character" if member.ischr() else "block"
            raise UnsafeLayerError(
                name, f"{kind} device {member.devmajor}:{member.devminor} (allow_devices=False)"
            )
    elif not (member.isreg() or member.isdir() or member.issym() or member.isfifo()):
        raise UnsafeLayerError(name, f"unsupported tar entry type {member.type!r}")
    return LayerEntry(name, parts, "node")


def apply_whiteout(root: str, entry: LayerEntry, created: set[str]) -> None:
    """Apply a ``whiteout``/``opaque`` entry under ``root``: what lower layers put there goes.

    ``created`` holds the ``rel`` names this layer has written so far (they stay).
    Below a missing directory there is nothing to white out.

    Example::

        apply_whiteout("/tmp/root", check_entry(member, state), created)
    """
    parts = list(entry.parts)
    try:
        parent = _resolve_parent(root, parts[:-1], entry.name, create=False)
    except _MissingParent:
        return  # nothing below a missing directory to white out
    parent_rel = "/".join(parts[:-1])
    if entry.kind == "opaque":
        for child in os.listdir(parent):
            if (f"{parent_rel}/{child}" if parent_rel else child) not in created:
                remove_node(os.path.join(parent, child))
        return
    target = parts[-1][len(WHITEOUT_PREFIX) :]
    if (f"{parent_rel}/{target}" if parent_rel else target) not in created:
        remove_node(os.path.join(parent, target))


def resolve_entry(root: str, entry: LayerEntry) -> str | None:
    """The host path of ``entry`` inside ``root``, its parent resolved by our rule.

    For trees another tool wrote (:class:`~rootfs._umoci.UmociUnpacker`): a parent that
    escapes the root raises :class:`UnsafeLayerError`; one that is missing or not a
    directory gives None. Never a path through a symlink the layer made.

    Example::

        path = resolve_entry("/tmp/root", check_entry(member, state))
    """
    if not entry.parts:
        return root
    try:
        parent = _resolve_parent(root, list(entry.parts[:-1]), entry.name, create=False)
    except _MissingParent:
        return None
    return os.path.join(parent, entry.parts[-1])


def iter_layer(stream: IO[bytes]) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The entries of an uncompressed layer ``stream``, in order, streamed.

    A stream that is not a tar, or breaks off, raises
    :class:`~rootfs.errors.ImageFormatError`; the tar is closed at the end.

    Example::

        with open("layer.tar", "rb") as f:
            names = [m.name for _, m in iter_layer(f)]
    """
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115
    except tarfile.TarError as exc:
        raise ImageFormatError(f"layer is not a tar archive: {exc}") from None
    try:
        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                return
            except tarfile.TarError as exc:
                raise ImageFormatError(f"corrupt layer tar: {exc}") from None
            yield tar, member
    finally:
        tar.close()


def scan_layer(fileobj: BinaryIO, *, state: UnpackState,
               copy_to: IO[bytes] | None = None) -> tuple[list[LayerEntry], str]:
    """:func:`check_entry` over every entry of a layer blob, writing nothing.

    Returns the entries and the layer's diff_id; ``copy_to`` receives the uncompressed
    tar. Damage raises :class:`~rootfs.errors.ImageFormatError`.

    Example::

        with open("layer.tar.zst", "rb") as f:
            entries, diff_id = scan_layer(f, state=UnpackState())
    """
    with _reading(fileobj, "layer could not be read", copy_to) as reader:
        entries = [check_entry(m, state) for _, m in iter_layer(cast(IO[bytes], reader))]
    return entries, "sha256:" + reader.sha.hexdigest()


def _apply_tar(reader: _HashingReader, root: str, st: UnpackState) -> None:
    created: set[str] = set()
    dirs: list[tuple[str, tarfile.TarInfo]] = []
    for tar, member in iter_layer(cast(IO[bytes], reader)):
        try:
            _apply_member(tar, member, root, st, created, dirs)
        except OSError as exc:
            raise UnsafeLayerError(
                member.name, f"cannot be written: {exc.strerror or exc}"
            ) from None
        except tarfile.TarError as exc:  # the member's data broke off
            raise ImageFormatError(f"corrupt layer tar: {exc}") from None
    for path, member in reversed(dirs):
        try:
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        except OSError:
            pass  # a later entry of this layer replaced the directory: no mtime to keep


def _apply_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    root: str,
    st: UnpackState,
    created: set[str],
    dirs: list[tuple[str, tarfile.TarInfo]],
) -> None:
    entry = check_entry(member, st)
    if entry.kind == "root":
        _apply_meta(root, member, st)
        dirs.append((root, member))
        return
    if entry.kind != "node":
        apply_whiteout(root, entry, created)
        return
    name = member.name
    parts = list(entry.parts)
    parent = _resolve_parent(root, parts[:-1], name, create=True)
    path = os.path.join(parent, parts[-1])
    created.add(entry.rel)
    if member.isdir():
        try:
            old = os.lstat(path)
            if not stat.S_ISDIR(old.st_mode):
                remove_node(path)
                os.mkdir(path, 0o700)
        except FileNotFoundError:
            os.mkdir(path, 0o700)
        _apply_meta(path, member, st)
        dirs.append((path, member))
        return
    if member.islnk():
        lparts = _split(member.linkname, "hardlink target", name)
        lparent = _resolve_parent(root, lparts[:-1], name, create=False)
        src = os.path.join(lparent, lparts[-1])
        try:
            sst = os.lstat(src)
        except FileNotFoundError:
            raise UnsafeLayerError(name, f"hardlink target {member.linkname!r} does not exist")
        if stat.S_ISDIR(sst.st_mode):
            raise UnsafeLayerError(name, f"hardlink target {member.linkname!r} is a directory")
        if os.path.abspath(src) == os.path.abspath(path):
            return
        remove_node(path)
        os.link(src, path, follow_symlinks=False)
        return
    remove_node(path)
    if member.isreg():
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "wb") as out:
            src_f = tar.extractfile(member)
            assert src_f is not None
            while chunk := src_f.read(_CHUNK):
                out.write(chunk)
    elif member.issym():
        os.symlink(member.linkname, path)
    elif member.isfifo():
        os.mkfifo(path, 0o600)
    else:  # a device: check_entry let it through, so allow_devices is set
        kindbit = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(path, kindbit | 0o600, os.makedev(member.devmajor, member.devminor))
    _apply_meta(path, member, st)


class NativeUnpacker:
    """The default :class:`~rootfs.protocols.Unpacker`: :func:`apply_layer` on a blob file.

    Example (``ImageStore(unpacker=NativeUnpacker())`` is the default)::

        >>> import io, tarfile
        >>> buf = io.BytesIO()
        >>> with tarfile.open(fileobj=buf, mode="w") as tar:
        ...     info = tarfile.TarInfo("etc/motd"); info.size = 3
        ...     tar.addfile(info, io.BytesIO(b"hi\\n"))
        >>> _ = Path("layer.tar").write_bytes(buf.getvalue())
        >>> from rootfs import NativeUnpacker, UnpackState
        >>> NativeUnpacker().apply(Path("layer.tar"), Path("root"), state=UnpackState())[:7]
        'sha256:'
        >>> Path("root/etc/motd").read_text()
        'hi\\n'
    """

    name = "native"

    def apply(self, blob: Path, dest: Path, *, state: UnpackState,
              expected_diff_id: str | None = None) -> str:
        """Apply layer file ``blob`` onto ``dest``; return its diff_id (see :func:`apply_layer`).

        Example::

            diff_id = NativeUnpacker().apply(Path("layer.tar.gz"), Path("root"),
                                             state=UnpackState())
        """
        with open(blob, "rb") as f:
            return apply_layer(f, dest, state=state, expected_diff_id=expected_diff_id)
