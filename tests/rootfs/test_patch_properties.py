"""Property: patches baked into an overlay upper == the same patches applied in place.

For random patch sequences, the real kernel overlayfs view (lower = image tree,
upper = our upper dir with whiteouts / opaque xattrs) must equal a copy of the image
patched in place, and both must refuse the same patch with PatchError.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rootfs import Patch, PatchError, apply_layer
from rootfs._patches import PatchTarget
from tests.rootfs._layers import E, layer
from tests.support import require_root

NAMES = ["etc", "motd", "conf.d", "lib", "usr", "x", "y", "new"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(lambda p: "/" + "/".join(p))
modes = st.sampled_from([None, 0o600, 0o755])


def _patch_strategy(src_file: str, src_dir: str) -> st.SearchStrategy[Patch]:
    rep = st.sampled_from([True, True, True, False])
    return st.one_of(
        st.builds(lambda p, m, r: Patch.text(p, "t", mode=m, replace=r), paths, modes, rep),
        st.builds(lambda p, r: Patch.file(p, b"\0f", replace=r), paths, rep),
        st.builds(lambda p: Patch.append(p, "+a"), paths),
        st.builds(lambda p, r: Patch.copy_file(src_file, p, replace=r), paths, rep),
        st.builds(lambda p, r: Patch.copy_dir(src_dir, p, replace=r), paths, rep),
        st.builds(lambda t, p, r: Patch.symlink(t, p, replace=r),
                  st.sampled_from(["/usr", "usr", "../x", "/nowhere"]), paths, rep),
        st.builds(lambda p, m: Patch.mkdir(p, mode=m), paths, modes),
        st.builds(Patch.remove, paths),
    )


def _lower(root: Path) -> None:
    data = layer(
        E("etc", "dir"), E("etc/motd", data=b"m"), E("etc/conf.d", "dir", mode=0o750),
        E("etc/conf.d/x", data=b"cx"), E("usr", "dir"), E("usr/lib", "dir"),
        E("usr/lib/y", data=b"ly", mode=0o640), E("lib", "symlink", link="usr/lib"),
        E("x", data=b"rootx"),
    )
    apply_layer(io.BytesIO(data), root)


def _snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    out: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", 0, os.readlink(p).encode())
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), b"")
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st_.st_mode), f.read())
    return out


def _apply_each(target: PatchTarget, patches: list[Patch]) -> list[int]:
    """Apply one by one; a refused patch must change nothing, so carry on. Return refusals."""
    refused = []
    for i, p in enumerate(patches):
        try:
            target.apply([p])
        except PatchError:
            refused.append(i)
    return refused


def test_overlay_equals_in_place(tmp_path_factory: pytest.TempPathFactory) -> None:
    require_root()
    base = tmp_path_factory.mktemp("prop")
    lower = base / "lower"
    _lower(lower)
    src_file = base / "src-file"
    src_file.write_text("copied")
    os.chmod(src_file, 0o700)
    src_dir = base / "src-dir"
    (src_dir / "sub").mkdir(parents=True)
    (src_dir / "sub" / "f").write_text("in dir")

    stats = {"runs": 0, "errors": 0, "patches": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(_patch_strategy(str(src_file), str(src_dir)), min_size=1, max_size=10))
    def check(patches: list[Patch]) -> None:
        work = Path(tempfile.mkdtemp(dir=base))
        try:
            upper, wd, merged, inplace = (work / n for n in ("upper", "work", "merged", "inplace"))
            for d in (upper, wd, merged):
                d.mkdir()
            shutil.copytree(lower, inplace, symlinks=True)
            err_overlay = _apply_each(PatchTarget(upper, lower), patches)
            err_inplace = _apply_each(PatchTarget(inplace), patches)
            assert err_overlay == err_inplace, (patches, err_overlay, err_inplace)
            stats["runs"] += 1
            stats["errors"] += len(err_overlay)
            stats["patches"] += len(patches) - len(err_overlay)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={lower},upperdir={upper},workdir={wd}", str(merged)],
                           check=True, capture_output=True)
            try:
                assert _snapshot(merged) == _snapshot(inplace), patches
            finally:
                subprocess.run(["umount", str(merged)], check=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    check()
    print(stats)
    assert stats["runs"] >= 150 and stats["patches"] > 2 * stats["runs"]
