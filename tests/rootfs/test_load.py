"""store.load: OCI layout directories and tarballs, and docker save archives (via skopeo)."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

import rootfs
from tests.rootfs._layers import E, base_layers, layer
from tests.rootfs._registry import policy_file
from tests.support import require_binaries


@pytest.fixture
def src(tmp_path: Path) -> tuple[rootfs.ImageStore, rootfs.Image, Path]:
    s = rootfs.ImageStore(tmp_path / "src")
    img = rootfs.image_from_layers(s, "local/layered:1", base_layers(),
                                   config={"Cmd": ["/bin/tool"], "Env": ["A=1"]})
    out = tmp_path / "layout"
    rootfs.write_oci_layout(s, out, {"v1": img})
    return s, img, out


def test_load_oci_layout_dir(src: tuple[rootfs.ImageStore, rootfs.Image, Path],
                             tmp_path: Path) -> None:
    _, img, out = src
    store = rootfs.ImageStore(tmp_path / "dst")
    [loaded] = store.load(out)
    assert loaded.digest == img.digest and loaded.ref == "localhost/layout:v1"
    assert loaded.cmd == ["/bin/tool"] and loaded.env == ["A=1"]
    [named] = store.load(out, ref="local/renamed:2")
    assert named.ref == "docker.io/local/renamed:2"
    store.unpack(named, tmp_path / "root")
    assert (tmp_path / "root/etc/motd").read_text() == "motd is back\n"


def test_load_oci_tarball(src: tuple[rootfs.ImageStore, rootfs.Image, Path],
                          tmp_path: Path) -> None:
    _, img, out = src
    tarball = tmp_path / "image.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(out, arcname=".")
    [loaded] = rootfs.ImageStore(tmp_path / "dst").load(tarball)
    assert loaded.digest == img.digest and loaded.ref == "localhost/image:v1"


def test_load_docker_save_and_oci_archive_from_skopeo(
        src: tuple[rootfs.ImageStore, rootfs.Image, Path], tmp_path: Path) -> None:
    require_binaries("skopeo")
    _, img, out = src
    pol = policy_file(tmp_path)
    docker_tar = tmp_path / "docker.tar"
    subprocess.run(["skopeo", "--policy", str(pol), "copy", "-q", f"oci:{out}:v1",
                    f"docker-archive:{docker_tar}:example.test/team/app:7"], check=True)
    with tarfile.open(docker_tar) as t:
        assert "manifest.json" in t.getnames()
    store = rootfs.ImageStore(tmp_path / "dst")
    [loaded] = store.load(docker_tar)
    assert loaded.ref == "example.test/team/app:7"
    assert loaded.diff_ids == img.diff_ids  # same content, regenerated manifest
    store.unpack(loaded, tmp_path / "root")
    assert sorted(p.name for p in (tmp_path / "root/opt/app").iterdir()) == ["new"]
    oci_tar = tmp_path / "oci.tar"
    subprocess.run(["skopeo", "--policy", str(pol), "copy", "-q", f"oci:{out}:v1",
                    f"oci-archive:{oci_tar}:v9"], check=True)
    [again] = store.load(oci_tar)
    assert again.ref == "localhost/oci:v9" and again.diff_ids == img.diff_ids


def test_load_rejects_garbage_and_traversal(tmp_path: Path) -> None:
    store = rootfs.ImageStore(tmp_path / "dst")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(rootfs.ImageFormatError, match="not a tar archive"):
        store.load(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(rootfs.ImageFormatError, match="neither an OCI layout"):
        store.load(empty)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "manifest.json").write_text(json.dumps(
        [{"Config": "../../etc/passwd", "RepoTags": ["x:1"], "Layers": []}]))
    with pytest.raises(rootfs.ImageFormatError, match=r"unsafe path '\.\./\.\./etc/passwd'"):
        store.load(evil)
    assert store.list() == []


def test_load_detects_tampered_blob(src: tuple[rootfs.ImageStore, rootfs.Image, Path],
                                    tmp_path: Path) -> None:
    _, img, out = src
    blob = out / "blobs/sha256" / img.layers[0].digest.partition(":")[2]
    data = bytearray(blob.read_bytes())
    blob.unlink()  # hardlinked from the source store: replace, do not modify in place
    data[10] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(rootfs.DigestError, match="mismatch"):
        rootfs.ImageStore(tmp_path / "dst").load(out)


def test_build_image_config_and_platform_validation(tmp_path: Path) -> None:
    store = rootfs.ImageStore(tmp_path / "s")
    with pytest.raises(rootfs.ImageFormatError, match="unknown image config key"):
        rootfs.image_from_layers(store, "a:1", [layer(E("x"))], config={"cmd": ["x"]})
    with pytest.raises(rootfs.ImageFormatError, match="bad platform 'amd64'"):
        rootfs.image_from_layers(store, "a:1", [layer(E("x"))], platform="amd64")
    with pytest.raises(rootfs.RootfsError, match="is not a directory"):
        rootfs.build_image(tmp_path / "missing", "a:1", store)


def test_save_and_load_round_trip(src: tuple[rootfs.ImageStore, rootfs.Image, Path],
                                  tmp_path: Path, busybox_tree: Path) -> None:
    s, img, _ = src
    bb = rootfs.build_image(busybox_tree, "registry.test:5000/tools/bb:1", s)
    tarball = s.save([img, "registry.test:5000/tools/bb:1"], tmp_path / "both.tar")
    layout_dir = s.save(img, tmp_path / "one")
    dst = rootfs.ImageStore(tmp_path / "dst")
    loaded = {i.ref: i.digest for i in dst.load(tarball)}
    assert loaded == {img.ref: img.digest, bb.ref: bb.digest}
    [again] = rootfs.ImageStore(tmp_path / "dst2").load(layout_dir)
    assert again.ref == img.ref
    with pytest.raises(rootfs.RootfsError, match="already exists"):
        s.save(img, tarball)
