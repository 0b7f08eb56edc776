"""Every patch kind, with and without replace, on lower (image) and upper paths."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

import rootfs
from rootfs import Patch, PatchError, apply_layer
from rootfs._patches import OPAQUE_XATTR, PatchTarget
from tests.rootfs._layers import E, layer
from tests.support import require_root


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    root = tmp_path / "lower"
    data = layer(
        E("etc", "dir"),
        E("etc/hosts", data=b"127.0.0.1 localhost\n", mode=0o640, gid=7),
        E("etc/motd", data=b"motd\n"),
        E("etc/conf.d", "dir", mode=0o750),
        E("etc/conf.d/a.conf", data=b"a"),
        E("usr", "dir"),
        E("usr/lib", "dir"),
        E("lib", "symlink", link="usr/lib"),
        E("abs", "symlink", link="/usr"),
        E("bin", "dir"),
        E("bin/sh", data=b"#!", mode=0o755),
        E("run", "fifo"),
    )
    apply_layer(io.BytesIO(data), root)
    return root


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    u = tmp_path / "upper"
    u.mkdir()
    return u


def _target(upper: Path, lower: Path) -> PatchTarget:
    return PatchTarget(upper, lower)


def _is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# -- constructors / validation -------------------------------------------------------


@pytest.mark.parametrize("bad", ["relative", "/a/../b", "/a//b", "/a/./b", "/a/", "/", "", "/a\0"])
def test_paths_must_be_absolute_and_normalised(bad: str) -> None:
    with pytest.raises(PatchError, match="text patch"):
        Patch.text(bad, "x")
    with pytest.raises(PatchError, match="remove patch"):
        Patch.remove(bad)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(PatchError, match="mode 4096"):
        Patch.text("/a", "x", mode=0o10000)
    with pytest.raises(PatchError, match="content must be str"):
        Patch.text("/a", b"x")  # type: ignore[arg-type]
    with pytest.raises(PatchError, match="content must be bytes"):
        Patch.file("/a", "x")  # type: ignore[arg-type]
    with pytest.raises(PatchError, match="unknown patch kind 'chmod'"):
        Patch.from_dict({"kind": "chmod", "path": "/a"})
    with pytest.raises(PatchError, match="missing field 'content'"):
        Patch.from_dict({"kind": "text", "path": "/a"})


def test_seed_hash_round_trip(tmp_path: Path) -> None:
    patches = [
        Patch.text("/etc/app.conf", "key = value\n", mode=0o644),
        Patch.file("/bin/blob", b"\0\1", mode=0o755, replace=True),
        Patch.append("/etc/hosts", "x\n"),
        Patch.copy_file("./cert.pem", "/etc/ssl/app.pem"),
        Patch.copy_dir("./app", "/opt/app", replace=True),
        Patch.symlink("/etc/app.conf", "/etc/app.link"),
        Patch.mkdir("/opt/app", mode=0o700),
        Patch.remove("/etc/motd"),
    ]
    for p in patches:
        assert Patch.from_dict(p.to_dict()) == p
    assert patches[0].to_dict() == {"kind": "text", "path": "/etc/app.conf",
                                    "content": "key = value\n", "replace": False, "mode": 0o644}
    assert patches[5].to_dict() == {"kind": "symlink", "target": "/etc/app.conf",
                                    "link": "/etc/app.link", "replace": False}


# -- text / file ----------------------------------------------------------------------


def test_text_new_path_default_mode_and_parents(upper: Path, lower: Path) -> None:
    _target(upper, lower).apply([Patch.text("/opt/new/dir/app.conf", "hello\n")])
    f = upper / "opt/new/dir/app.conf"
    assert f.read_text() == "hello\n"
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE((upper / "opt").stat().st_mode) == 0o755


def test_text_on_lower_path_needs_replace(upper: Path, lower: Path) -> None:
    with pytest.raises(PatchError, match=r"path exists in image layer: '/etc/motd' \(set replace"):
        _target(upper, lower).apply([Patch.text("/etc/motd", "x")])
    assert not (upper / "etc/motd").exists()
    _target(upper, lower).apply([Patch.text("/etc/motd", "new\n", mode=0o600, replace=True)])
    assert (upper / "etc/motd").read_text() == "new\n"
    assert stat.S_IMODE((upper / "etc/motd").stat().st_mode) == 0o600


def test_text_on_upper_path_needs_replace(upper: Path, lower: Path) -> None:
    t = _target(upper, lower)
    t.apply([Patch.file("/opt/x", b"\0one")])
    with pytest.raises(PatchError, match=r"path already exists in rootfs: '/opt/x'"):
        t.apply([Patch.file("/opt/x", b"two")])
    t.apply([Patch.file("/opt/x", b"two", replace=True)])
    assert (upper / "opt/x").read_bytes() == b"two"


def test_copied_up_parent_keeps_lower_dir_mode(upper: Path, lower: Path) -> None:
    _target(upper, lower).apply([Patch.text("/etc/conf.d/b.conf", "b")])
    assert stat.S_IMODE((upper / "etc/conf.d").stat().st_mode) == 0o750
    assert not (upper / "etc/conf.d/a.conf").exists()  # lower child stays in the lower


def test_parent_symlinks_resolve_in_the_guest_view(upper: Path, lower: Path) -> None:
    t = _target(upper, lower)
    t.apply([Patch.text("/lib/libnew.so", "so"), Patch.text("/abs/share/x", "y")])
    assert (upper / "usr/lib/libnew.so").read_text() == "so"
    assert (upper / "usr/share/x").read_text() == "y"
    assert not (upper / "lib").exists() and not (upper / "abs").exists()


def test_parent_that_is_a_file_is_an_error(upper: Path, lower: Path) -> None:
    with pytest.raises(PatchError, match=r"parent '/etc/motd' is a regular file"):
        _target(upper, lower).apply([Patch.text("/etc/motd/x", "y")])


# -- copy_file / copy_dir -------------------------------------------------------------


def test_copy_file_keeps_source_mode_or_uses_given(upper: Path, lower: Path,
                                                    tmp_path: Path) -> None:
    src = tmp_path / "tool"
    src.write_bytes(b"#!/bin/sh\n")
    os.chmod(src, 0o750)
    t = _target(upper, lower)
    t.apply([Patch.copy_file(src, "/usr/local/bin/tool"),
             Patch.copy_file(src, "/usr/local/bin/tool2", mode=0o700)])
    assert stat.S_IMODE((upper / "usr/local/bin/tool").stat().st_mode) == 0o750
    assert stat.S_IMODE((upper / "usr/local/bin/tool2").stat().st_mode) == 0o700
    with pytest.raises(PatchError, match="path exists in image layer: '/bin/sh'"):
        t.apply([Patch.copy_file(src, "/bin/sh")])
    t.apply([Patch.copy_file(src, "/bin/sh", replace=True)])
    assert (upper / "bin/sh").read_bytes() == b"#!/bin/sh\n"
    with pytest.raises(PatchError, match=r"source .*missing"):
        t.apply([Patch.copy_file(tmp_path / "missing", "/x")])


def test_copy_dir_new_and_replace(upper: Path, lower: Path, tmp_path: Path) -> None:
    src = tmp_path / "app"
    (src / "sub").mkdir(parents=True)
    (src / "sub/f").write_text("f")
    os.chmod(src / "sub", 0o700)
    os.symlink("sub/f", src / "link")
    t = _target(upper, lower)
    t.apply([Patch.copy_dir(src, "/opt/app")])
    assert (upper / "opt/app/sub/f").read_text() == "f"
    assert os.readlink(upper / "opt/app/link") == "sub/f"
    assert stat.S_IMODE((upper / "opt/app/sub").stat().st_mode) == 0o700
    with pytest.raises(PatchError, match="already exists in rootfs: '/opt/app'"):
        t.apply([Patch.copy_dir(src, "/opt/app")])
    with pytest.raises(PatchError, match=r"exists in image layer: ./etc/conf\.d."):
        t.apply([Patch.copy_dir(src, "/etc/conf.d")])
    require_root()
    t.apply([Patch.copy_dir(src, "/etc/conf.d", replace=True)])
    assert os.getxattr(upper / "etc/conf.d", OPAQUE_XATTR) == b"y"  # exactly the source tree


def test_copy_dir_refuses_special_files(upper: Path, lower: Path, tmp_path: Path) -> None:
    src = tmp_path / "app"
    src.mkdir()
    os.mkfifo(src / "pipe")
    with pytest.raises(PatchError, match="is a fifo"):
        _target(upper, lower).apply([Patch.copy_dir(src, "/opt/app")])


# -- symlink ----------------------------------------------------------------------------


def test_symlink_new_lower_and_upper(upper: Path, lower: Path) -> None:
    t = _target(upper, lower)
    t.apply([Patch.symlink("/etc/hosts", "/etc/hosts.link")])
    assert os.readlink(upper / "etc/hosts.link") == "/etc/hosts"
    with pytest.raises(PatchError, match="exists in image layer: '/etc/motd'"):
        t.apply([Patch.symlink("/x", "/etc/motd")])
    with pytest.raises(PatchError, match=r"already exists in rootfs: ./etc/hosts\.link."):
        t.apply([Patch.symlink("/x", "/etc/hosts.link")])
    t.apply([Patch.symlink("/x", "/etc/hosts.link", replace=True),
             Patch.symlink("/y", "/etc/motd", replace=True)])
    assert os.readlink(upper / "etc/hosts.link") == "/x"
    assert os.readlink(upper / "etc/motd") == "/y"


# -- mkdir ------------------------------------------------------------------------------


def test_mkdir_is_idempotent_and_refuses_non_dirs(upper: Path, lower: Path) -> None:
    t = _target(upper, lower)
    t.apply([Patch.mkdir("/etc"), Patch.mkdir("/opt/a/b", mode=0o700), Patch.mkdir("/opt/a/b")])
    assert not (upper / "etc").exists()  # already a dir in the image: nothing to do
    assert stat.S_IMODE((upper / "opt/a/b").stat().st_mode) == 0o700
    assert stat.S_IMODE((upper / "opt/a").stat().st_mode) == 0o755
    with pytest.raises(PatchError, match="cannot create directory at '/etc/motd': path exists "
                                         "and is not a directory"):
        t.apply([Patch.mkdir("/etc/motd")])
    t.apply([Patch.text("/opt/f", "x")])
    with pytest.raises(PatchError, match="cannot create directory at '/opt/f'"):
        t.apply([Patch.mkdir("/opt/f")])


def test_mkdir_after_remove_replaces_the_whiteout_with_an_opaque_dir(upper: Path,
                                                                      lower: Path) -> None:
    require_root()
    t = _target(upper, lower)
    t.apply([Patch.remove("/etc/conf.d")])
    assert _is_whiteout(upper / "etc/conf.d")
    t.apply([Patch.mkdir("/etc/conf.d")])
    assert (upper / "etc/conf.d").is_dir()
    assert os.getxattr(upper / "etc/conf.d", OPAQUE_XATTR) == b"y"


# -- append -----------------------------------------------------------------------------


def test_append_copies_up_keeping_mode_and_owner(upper: Path, lower: Path) -> None:
    _target(upper, lower).apply([Patch.append("/etc/hosts", "203.0.113.7 db\n")])
    f = upper / "etc/hosts"
    assert f.read_text() == "127.0.0.1 localhost\n203.0.113.7 db\n"
    assert stat.S_IMODE(f.stat().st_mode) == 0o640  # upstream resets to 0644
    if os.geteuid() == 0:
        assert f.stat().st_gid == 7


def test_append_to_upper_file_and_errors(upper: Path, lower: Path) -> None:
    t = _target(upper, lower)
    t.apply([Patch.text("/opt/log", "a\n"), Patch.append("/opt/log", "b\n")])
    assert (upper / "opt/log").read_text() == "a\nb\n"
    with pytest.raises(PatchError, match="cannot append to '/nope': file not found in rootfs"):
        t.apply([Patch.append("/nope", "x")])
    with pytest.raises(PatchError, match=r"target is not a regular file \(directory\)"):
        t.apply([Patch.append("/etc", "x")])
    with pytest.raises(PatchError, match=r"target is not a regular file \(fifo\)"):
        t.apply([Patch.append("/run", "x")])
    with pytest.raises(PatchError, match=r"not a regular file \(symlink\)"):
        t.apply([Patch.append("/lib", "x")])


def test_append_after_remove_is_not_found(upper: Path, lower: Path) -> None:
    require_root()
    t = _target(upper, lower)
    t.apply([Patch.remove("/etc/motd")])
    with pytest.raises(PatchError, match="cannot append to '/etc/motd'"):
        t.apply([Patch.append("/etc/motd", "x")])


# -- remove -----------------------------------------------------------------------------


def test_remove_lower_leaves_whiteout_upper_is_deleted_missing_is_noop(upper: Path,
                                                                        lower: Path) -> None:
    require_root()
    t = _target(upper, lower)
    t.apply([Patch.text("/opt/tmp", "x"), Patch.remove("/opt/tmp"), Patch.remove("/etc/motd"),
             Patch.remove("/does/not/exist")])
    assert not (upper / "opt/tmp").exists()
    assert _is_whiteout(upper / "etc/motd")
    assert t.whiteouts == 1
    assert not (upper / "does").exists()
    # Writing again after a remove replaces the whiteout (no replace needed: it is gone).
    t.apply([Patch.text("/etc/motd", "again\n")])
    assert (upper / "etc/motd").read_text() == "again\n"


def test_remove_upper_dir_over_lower_dir(upper: Path, lower: Path) -> None:
    require_root()
    t = _target(upper, lower)
    t.apply([Patch.text("/etc/conf.d/b.conf", "b"), Patch.remove("/etc/conf.d")])
    assert _is_whiteout(upper / "etc/conf.d")


# -- bind and disk roots ------------------------------------------------------------------


def test_bind_root_patched_in_place(tmp_path: Path) -> None:
    root = tmp_path / "bind"
    (root / "etc").mkdir(parents=True)
    (root / "etc/motd").write_text("m")
    (root / "etc/hosts").write_text("h\n")
    os.chmod(root / "etc/hosts", 0o600)
    os.symlink("/etc", root / "etclink")
    prepared = rootfs.prepare_bind_root(root, patches=[
        Patch.text("/etc/new", "n"),
        Patch.remove("/etc/motd"),
        Patch.append("/etc/hosts", "x\n"),
        Patch.text("/etclink/via", "guest symlink semantics"),
        Patch.mkdir("/var/lib"),
    ])
    assert prepared.kind == "bind" and prepared.mount_plan() == {"kind": "bind",
                                                                  "dir": str(root.resolve())}
    assert (root / "etc/new").read_text() == "n"
    assert not (root / "etc/motd").exists()
    assert (root / "etc/hosts").read_text() == "h\nx\n"
    assert stat.S_IMODE((root / "etc/hosts").stat().st_mode) == 0o600
    assert (root / "etc/via").read_text() == "guest symlink semantics"
    assert not Path("/etc/via").exists()
    assert (root / "var/lib").is_dir()
    with pytest.raises(PatchError, match="already exists in rootfs: '/etc/new'"):
        rootfs.prepare_bind_root(root, patches=[Patch.text("/etc/new", "again")])


def test_bind_root_dotdot_symlink_is_refused(tmp_path: Path) -> None:
    # one rule with layer unpacking (rootfs._walk): a '..' above the root is refused
    root = tmp_path / "bind"
    root.mkdir()
    (tmp_path / "victim").mkdir()
    os.symlink("../../../../victim", root / "up")
    with pytest.raises(PatchError,
                       match=r"climbs above the root .*'/up' -> '\.\./\.\./\.\./\.\./victim'"):
        rootfs.prepare_bind_root(root, patches=[Patch.text("/up/x", "refused")])
    assert not (tmp_path / "victim/x").exists() and not (root / "victim").exists()


def test_disk_root_rejects_patches_and_detects_format(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * 4096)
    q = tmp_path / "disk.bin"
    q.write_bytes(b"QFI\xfb" + b"\0" * 100)
    r = rootfs.prepare_disk_root(raw)
    assert r.image_format == "raw" and r.kind == "disk"
    assert r.mount_plan() == {"kind": "disk", "root": {"disk": str(raw.resolve()),
                                                       "fstype": "ext4"}}
    assert rootfs.prepare_disk_root(q, fstype="xfs").image_format == "qcow2"
    with pytest.raises(PatchError, match="not supported for disk-image roots"):
        rootfs.prepare_disk_root(raw, patches=[Patch.mkdir("/x")])
    with pytest.raises(rootfs.DiskError, match="does not exist"):
        rootfs.prepare_disk_root(tmp_path / "missing.qcow2")


def test_non_patch_objects_are_refused(upper: Path, lower: Path) -> None:
    with pytest.raises(PatchError, match="not a Patch"):
        _target(upper, lower).apply([{"kind": "mkdir", "path": "/x"}])  # type: ignore[list-item]


# -- the full matrix: kind x (new / lower / upper path) x replace ----------------------------

_KINDS = ["text", "file", "copy_file", "copy_dir", "symlink"]


def _make(kind: str, path: str, replace: bool, tmp: Path) -> Patch:
    if kind == "text":
        return Patch.text(path, "T", replace=replace)
    if kind == "file":
        return Patch.file(path, b"F", replace=replace)
    if kind == "copy_file":
        (tmp / "cf").write_text("C")
        return Patch.copy_file(tmp / "cf", path, replace=replace)
    if kind == "copy_dir":
        (tmp / "cd").mkdir(exist_ok=True)
        (tmp / "cd" / "inner").write_text("D")
        return Patch.copy_dir(tmp / "cd", path, replace=replace)
    return Patch.symlink("/target", path, replace=replace)


def _check(kind: str, host: Path) -> None:
    if kind == "symlink":
        assert os.readlink(host) == "/target"
    elif kind == "copy_dir":
        assert (host / "inner").read_text() == "D"
    else:
        assert host.read_bytes() == {"text": b"T", "file": b"F", "copy_file": b"C"}[kind]


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("where", ["new", "lower", "upper"])
@pytest.mark.parametrize("replace", [False, True])
def test_patch_matrix(kind: str, where: str, replace: bool, upper: Path, lower: Path,
                      tmp_path: Path) -> None:
    t = _target(upper, lower)
    path = {"new": "/srv/thing", "lower": "/etc/motd", "upper": "/srv/earlier"}[where]
    if where == "upper":
        t.apply([Patch.text(path, "earlier")])
    patch = _make(kind, path, replace, tmp_path)
    if where != "new" and not replace:
        msg = "path exists in image layer" if where == "lower" else "path already exists in rootfs"
        with pytest.raises(PatchError, match=f"{kind} patch: {msg}: '{path}'"):
            t.apply([patch])
        return
    if kind == "copy_dir" and where == "lower" and os.geteuid() != 0:
        pytest.skip("opaque xattr needs root")
    t.apply([patch])
    _check(kind, upper / path.lstrip("/"))


def test_copy_dir_after_remove_hides_the_image_dir(upper: Path, lower: Path,
                                                   tmp_path: Path) -> None:
    # Found by the overlay-vs-in-place property test: the whiteout left by remove was
    # replaced by a plain (merging) directory, so the image's files showed through.
    require_root()
    src = tmp_path / "src"
    src.mkdir()
    (src / "only").write_text("o")
    t = _target(upper, lower)
    t.apply([Patch.remove("/etc/conf.d"), Patch.copy_dir(src, "/etc/conf.d")])
    assert os.getxattr(upper / "etc/conf.d", OPAQUE_XATTR) == b"y"
