"""Safe layer unpacking: OCI semantics kept, hostile layers refused with the entry named."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

import rootfs
from rootfs import UnpackLimits, UnpackState, apply_layer
from tests.rootfs._layers import E, base_layers, layer
from tests.support import require_binaries, require_root


def _apply(layers: list[bytes], dest: Path, **limits: object) -> UnpackState:
    state = UnpackState(UnpackLimits(**limits))  # type: ignore[arg-type]
    for data in layers:
        apply_layer(io.BytesIO(data), dest, state=state)
    return state


def test_layers_flatten_with_whiteouts_opaque_links_and_metadata(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    _apply(base_layers(), dest)
    # whiteout then re-added in a later layer
    assert (dest / "etc/motd").read_bytes() == b"motd is back\n"
    assert not (dest / "gone").exists()
    # opaque dir: lower children gone, same-layer child kept, new mode applied
    assert sorted(os.listdir(dest / "opt/app")) == ["new"]
    assert stat.S_IMODE(os.stat(dest / "opt/app").st_mode) == 0o750
    # symlink kept as symlink, and a later layer wrote through it to usr/lib
    assert os.readlink(dest / "lib") == "usr/lib"
    assert (dest / "usr/lib/liby.so").read_bytes() == b"ELF2"
    # hardlink shares the inode
    assert os.stat(dest / "data/hard").st_ino == os.stat(dest / "data/file").st_ino
    # modes incl. setuid and sticky
    assert stat.S_IMODE(os.stat(dest / "bin/tool").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(dest / "data").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(dest / "etc/hosts").st_mode) == 0o640
    assert os.getxattr(dest / "data/file", "user.note") == b"kept"
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(dest) for n in ds + fs)


def test_ownership_kept_as_root(tmp_path: Path) -> None:
    require_root()
    dest = tmp_path / "root"
    _apply(base_layers(), dest)
    st = os.stat(dest / "data/file")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert os.stat(dest / "etc/shadow-like").st_gid == 42


def test_diff_id_returned_and_verified(tmp_path: Path) -> None:
    import hashlib

    data = layer(E("a", data=b"x"))
    want = "sha256:" + hashlib.sha256(data).hexdigest()
    assert apply_layer(io.BytesIO(data), tmp_path / "r") == want
    with pytest.raises(rootfs.DigestError, match="diff_id mismatch"):
        apply_layer(io.BytesIO(data), tmp_path / "r2", expected_diff_id="sha256:" + "0" * 64)


def test_gzip_layers_are_decompressed(tmp_path: Path) -> None:
    import gzip

    data = layer(E("f", data=b"zipped"))
    apply_layer(io.BytesIO(gzip.compress(data)), tmp_path / "r")
    assert (tmp_path / "r/f").read_bytes() == b"zipped"


def test_zstd_layers_are_decompressed(tmp_path: Path) -> None:
    require_binaries("zstd")
    data = layer(E("f", data=b"zstd!"))
    comp = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    apply_layer(io.BytesIO(comp), tmp_path / "r")
    assert (tmp_path / "r/f").read_bytes() == b"zstd!"


def test_zstd_multi_frame_and_skippable_frames_are_read(tmp_path: Path) -> None:
    import zstandard

    data = layer(E("f", data=b"one" * 50_000), E("g", data=os.urandom(70_000)))
    half = len(data) // 2
    skippable = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc"
    comp = (zstandard.ZstdCompressor(write_checksum=True).compress(data[:half]) + skippable
            + zstandard.ZstdCompressor(level=9, write_content_size=False).compress(data[half:]))
    want = "sha256:" + hashlib.sha256(data).hexdigest()
    assert apply_layer(io.BytesIO(comp), tmp_path / "r") == want
    assert (tmp_path / "r/f").read_bytes() == b"one" * 50_000


@pytest.mark.parametrize("damage", ["truncated", "cut-at-a-block", "garbage-after",
                                    "huge-window", "corrupt"])
def test_damaged_zstd_layers_are_format_errors(tmp_path: Path, damage: str) -> None:
    import zstandard

    data = layer(E("f", data=os.urandom(200_000)), E("g", data=b"z" * 300_000))
    comp = zstandard.ZstdCompressor().compress(data)
    if damage == "truncated":
        comp = comp[: len(comp) - 100]
    elif damage == "cut-at-a-block":
        comp = comp[:-1]
    elif damage == "garbage-after":
        comp += b"\x00garbage!"
    elif damage == "huge-window":  # a frame that asks for a 1 GiB window: not decoded
        params = zstandard.ZstdCompressionParameters.from_level(3, window_log=30)
        obj = zstandard.ZstdCompressor(compression_params=params).compressobj()
        comp = obj.compress(data) + obj.flush()
    else:
        comp = comp[:40] + bytes(b ^ 0xFF for b in comp[40:80]) + comp[80:]
    with pytest.raises(rootfs.ImageFormatError):
        apply_layer(io.BytesIO(comp), tmp_path / "r")


def test_not_a_tar_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(rootfs.ImageFormatError):
        apply_layer(io.BytesIO(b"this is not a tar archive at all" * 20), tmp_path / "r")


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A file next to dest that hostile layers try to reach."""
    (tmp_path / "outside").mkdir()
    s = tmp_path / "outside" / "target"
    s.write_text("original")
    return s


HOSTILE = {
    "dotdot": ([layer(E("../outside/target", data=b"pwned"))], "../outside/target", "'..'"),
    "dotdot-nested": ([layer(E("a/../../outside/target", data=b"pwned"))],
                      "a/../../outside/target", "'..'"),
    "absolute": ([layer(E("/etc/passwd", data=b"pwned"))], "/etc/passwd", "absolute"),
    "symlink-then-file-rel": (
        [layer(E("evil", "symlink", link="../outside"), E("evil/target", data=b"pwned"))],
        "evil/target", "climbs above the root"),
    "symlink-then-file-next-layer": (
        [layer(E("evil", "symlink", link="../../..")), layer(E("evil/x", data=b"pwned"))],
        "evil/x", "climbs above the root"),
    "hardlink-abs": ([layer(E("shadow", "hardlink", link="/etc/shadow"))], "shadow", "absolute"),
    "hardlink-dotdot": ([layer(E("shadow", "hardlink", link="../../../../etc/shadow"))],
                        "shadow", "'..'"),
    "hardlink-through-symlink-loop": (
        [layer(E("etc", "symlink", link="/etc"), E("shadow", "hardlink", link="etc/shadow"))],
        "shadow", "symlinks in the parent path"),
    "hardlink-through-symlink-abs": (
        [layer(E("etc", "symlink", link="/real"), E("shadow", "hardlink", link="etc/shadow"))],
        "shadow", "parent 'real' is missing"),
    "chr-device": ([layer(E("dev/mem", "chr", dev=(1, 1)))], "dev/mem", "character device"),
    "blk-device": ([layer(E("dev/sda", "blk", dev=(8, 0)))], "dev/sda", "block device"),
    "10GB-claim": ([layer(E("big", size=10 << 30))], "big", "max_bytes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused(case: str, tmp_path: Path, sentinel: Path) -> None:
    layers, entry, reason = HOSTILE[case]
    dest = tmp_path / "root"
    with pytest.raises(rootfs.UnsafeLayerError, match=reason) as info:
        _apply(layers, dest)
    assert info.value.entry == entry
    assert entry in str(info.value)
    assert sentinel.read_text() == "original"
    assert os.path.exists("/etc/passwd")


def test_real_gnu_sparse_10gb_file_is_refused(tmp_path: Path, sentinel: Path) -> None:
    require_binaries("tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(10 << 30)
    out = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-S", "-cf", str(out), "-C", str(src), "sparse"], check=True)
    assert out.stat().st_size < 1 << 20  # a tiny archive claiming 10 GiB
    with open(out, "rb") as f, pytest.raises(rootfs.UnsafeLayerError, match="max_bytes"):
        apply_layer(f, tmp_path / "root")
    assert not (tmp_path / "root" / "sparse").exists()


def test_devices_allowed_when_asked(tmp_path: Path) -> None:
    require_root()
    _apply([layer(E("dev/null", "chr", dev=(1, 3), mode=0o666))], tmp_path / "r",
           allow_devices=True)
    st = os.lstat(tmp_path / "r/dev/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


def test_file_count_limit(tmp_path: Path) -> None:
    entries = [E(f"f{i}", data=b"") for i in range(20)]
    with pytest.raises(rootfs.UnsafeLayerError, match="max_files") as info:
        _apply([layer(*entries)], tmp_path / "r", max_files=10)
    assert info.value.entry == "f10"


def test_total_size_limit_across_layers(tmp_path: Path) -> None:
    l1 = layer(E("a", data=b"x" * 600))
    l2 = layer(E("b", data=b"x" * 600))
    with pytest.raises(rootfs.UnsafeLayerError, match="max_bytes") as info:
        _apply([l1, l2], tmp_path / "r", max_bytes=1000)
    assert info.value.entry == "b"


def test_safe_relative_symlinks_are_followed(tmp_path: Path) -> None:
    _apply([layer(E("usr/lib", "dir"), E("lib", "symlink", link="usr/lib"),
                  E("lib/x.so", data=b"so"))], tmp_path / "r")
    assert (tmp_path / "r/usr/lib/x.so").read_bytes() == b"so"
    assert os.path.islink(tmp_path / "r/lib")


def test_final_symlink_is_replaced_not_written_through(tmp_path: Path, sentinel: Path) -> None:
    # An entry whose own name is an existing symlink replaces the link.
    _apply([layer(E("t", "symlink", link=str(sentinel))), layer(E("t", data=b"new"))],
           tmp_path / "r")
    assert sentinel.read_text() == "original"
    assert (tmp_path / "r/t").read_bytes() == b"new" and not os.path.islink(tmp_path / "r/t")


def test_symlink_escaping_is_harmless_as_a_leaf(tmp_path: Path) -> None:
    # A dangling or absolute symlink is fine as long as nothing is written through it.
    _apply([layer(E("etc/link", "symlink", link="/etc/shadow"))], tmp_path / "r")
    assert os.readlink(tmp_path / "r/etc/link") == "/etc/shadow"


def test_directory_replaced_later_in_the_same_layer(tmp_path: Path) -> None:
    # Found by hypothesis: the end-of-layer mtime pass tripped over a replaced directory.
    _apply([layer(E("a", "dir"), E("a/b", "dir"), E("a", data=b"now a file"))], tmp_path / "r")
    assert (tmp_path / "r/a").read_bytes() == b"now a file"


def test_whiteout_under_missing_dir_creates_nothing(tmp_path: Path) -> None:
    _apply([layer(E("a", data=b"1")), layer(E("nope/deeper/.wh.x"), E("a/.wh.y"))],
           tmp_path / "r")
    assert sorted(os.listdir(tmp_path / "r")) == ["a"]


def test_same_layer_order_whiteout_does_not_remove_new_entry(tmp_path: Path) -> None:
    _apply([layer(E("d", "dir"), E("d/keep", data=b"1")),
            layer(E("d/new", data=b"2"), E("d/.wh..wh..opq"))], tmp_path / "r")
    assert os.listdir(tmp_path / "r/d") == ["new"]


def test_hypothesis_names_never_escape(tmp_path_factory: pytest.TempPathFactory) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    comp = st.sampled_from(["..", ".", "", "a", "b", "/", "etc", ".wh.a", ".wh..wh..opq"])
    names = st.lists(comp, min_size=1, max_size=5).map("/".join)
    kinds = st.sampled_from(["file", "dir", "symlink", "hardlink"])
    entry = st.builds(lambda n, k, ln: E(n, k, data=b"x", link=ln), names, kinds, names)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(entry, min_size=1, max_size=6))
    def run(entries: list[E]) -> None:
        base = tmp_path_factory.mktemp("h")
        outside = base / "outside"
        outside.mkdir()
        dest = base / "root"
        try:
            _apply([layer(*entries)], dest)
        except (rootfs.UnsafeLayerError, rootfs.ImageFormatError):
            pass
        assert os.listdir(outside) == []
        for dirpath, dirnames, filenames in os.walk(dest):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                assert os.path.realpath(os.path.dirname(p)).startswith(str(dest))

    run()


def test_os_errors_become_typed_errors_naming_the_entry(tmp_path: Path) -> None:
    name = "d/" + "x" * 300  # one component longer than NAME_MAX
    with pytest.raises(rootfs.UnsafeLayerError, match="cannot be written") as info:
        _apply([layer(E(name, data=b"x"))], tmp_path / "r")
    assert info.value.entry == name


def test_tarfile_long_names_and_pax(tmp_path: Path) -> None:
    long = "d/" + "x" * 200 + "/" + "y" * 150
    _apply([layer(E(long, data=b"long"))], tmp_path / "r")
    assert (tmp_path / "r" / long).read_bytes() == b"long"
    assert tarfile is not None
