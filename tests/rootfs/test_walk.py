"""One parent walker, one rule (rootfs._walk), for layer unpacking AND patches alike.

Each case builds the same tree of symlinks twice, once as an image layer (then a
second layer writes ``entry``) and once as a bind root (then a patch writes
``entry``), and checks both end the same way: the file lands at ``lands`` inside the
root, or both are refused with a typed error naming why. Nothing ever appears
outside the root, whatever the symlinks say.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

import rootfs
from rootfs import Patch, UnpackLimits, UnpackState, apply_layer
from tests.rootfs._layers import E, layer

OUT = "@OUT@"  # replaced by the absolute host path of a directory outside the root

# name -> (symlinks/dirs to create: (path, link target or None for a dir), entry, outcome)
# outcome: ("lands", path inside the root) or ("refused", message part)
CASES: dict[str, tuple[list[tuple[str, str | None]], str, tuple[str, str]]] = {
    "absolute symlink restarts at the root": (
        [("srv", None), ("srv/data", None), ("data", "/srv/data")], "data/f",
        ("lands", "srv/data/f")),
    "absolute symlink naming a host path stays inside": (
        [("h", OUT)], "h/f", ("lands", OUT.lstrip("/") + "/f")),
    "symlinked parent directory (relative)": (
        [("real", None), ("sub", None), ("sub/inner", "../real")], "sub/inner/f",
        ("lands", "real/f")),
    "'..' chain that stays inside": (
        [("z", None), ("x", None), ("x/y", None), ("x/y/l", "../../z")], "x/y/l/f",
        ("lands", "z/f")),
    "'../' chain climbing out": (
        [("up", "../../../../outside")], "up/f", ("refused", "climbs above the root")),
    "absolute then '..' out": (
        [("up", "/../outside")], "up/f", ("refused", "climbs above the root")),
    "symlink to a symlink to outside": (
        [("a", "b"), ("b", "../outside")], "a/f", ("refused", "climbs above the root")),
    "symlink to a symlink to an absolute host path": (
        [("a", "b"), ("b", OUT)], "a/f", ("lands", OUT.lstrip("/") + "/f")),
    "symlink in a symlinked directory to outside": (
        [("d", None), ("d/l", "../../outside"), ("s", "d")], "s/l/f",
        ("refused", "climbs above the root")),
    "symlink loop": (
        [("l1", "l2"), ("l2", "l1")], "l1/f", ("refused", "symlinks in the parent path")),
}


def _tree(cases: list[tuple[str, str | None]], out: Path) -> list[tuple[str, str | None]]:
    return [(p, None if t is None else t.replace(OUT, str(out))) for p, t in cases]


def _unpack(tree: list[tuple[str, str | None]], entry: str, root: Path) -> None:
    first = layer(*[E(p, "dir") if t is None else E(p, "symlink", link=t) for p, t in tree])
    second = layer(E(entry, data=b"payload"))
    state = UnpackState(UnpackLimits())
    for data in (first, second):
        apply_layer(io.BytesIO(data), root, state=state)


def _patch(tree: list[tuple[str, str | None]], entry: str, root: Path) -> None:
    root.mkdir()
    for p, t in tree:
        if t is None:
            (root / p).mkdir()
        else:
            os.symlink(t, root / p)
    rootfs.prepare_bind_root(root, patches=[Patch.text("/" + entry, "payload")])


@pytest.mark.parametrize("how", ["unpack", "patch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_symlink_tricks_one_rule(case: str, how: str, tmp_path: Path) -> None:
    out = tmp_path / "outside"
    out.mkdir()
    root = tmp_path / "root"
    spec, entry, (outcome, detail) = CASES[case]
    tree = _tree(spec, out)
    error = rootfs.UnsafeLayerError if how == "unpack" else rootfs.PatchError
    run = _unpack if how == "unpack" else _patch
    if outcome == "lands":
        run(tree, entry, root)
        where = root / detail.replace(OUT.lstrip("/"), str(out).lstrip("/"))
        assert where.read_bytes() == b"payload"
        assert not where.is_symlink() and where.resolve().is_relative_to(root.resolve())
    else:
        with pytest.raises(error, match=detail):
            run(tree, entry, root)
    assert list(out.iterdir()) == [], "something was written outside the root"
    assert not (tmp_path / "f").exists()
