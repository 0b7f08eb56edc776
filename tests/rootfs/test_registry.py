"""Pulls from a real registry (Debian's docker-registry): HTTP, TLS + CA, basic and token auth."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

import rootfs
from rootfs import RegistryAuth
from tests.rootfs._layers import E, base_layers, layer
from tests.rootfs._registry import FlakyProxy, Registry, policy_file
from tests.support import require_binaries, require_root


@pytest.fixture(scope="module")
def src_store(tmp_path_factory: pytest.TempPathFactory) -> rootfs.ImageStore:
    return rootfs.ImageStore(tmp_path_factory.mktemp("src-store"))


@pytest.fixture(scope="module")
def layout(src_store: rootfs.ImageStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with: layered (3 layers), multi (amd64+arm64 index), v1/v2."""
    amd = rootfs.image_from_layers(src_store, "local/layered:1", base_layers())
    arm = rootfs.image_from_layers(src_store, "local/layered:arm", [layer(E("arch", data=b"arm"))],
                                   platform="linux/arm64")
    v1 = rootfs.image_from_layers(src_store, "local/v:1", [layer(E("version", data=b"1"))])
    v2 = rootfs.image_from_layers(src_store, "local/v:2", [layer(E("version", data=b"2"))])
    out = tmp_path_factory.mktemp("layout") / "oci"
    rootfs.write_oci_layout(src_store, out, {"layered": amd, "multi": [amd, arm], "v1": v1,
                                             "v2": v2})
    return out


def _store(tmp_path: Path, name: str = "store") -> rootfs.ImageStore:
    return rootfs.ImageStore(tmp_path / name)


def test_insecure_http_pull_multi_layer(registry: Registry, layout: Path,
                                        src_store: rootfs.ImageStore, tmp_path: Path) -> None:
    ref = registry.push(layout, "layered", "team/layered")
    seen: dict[str, tuple[int, int]] = {}
    img = _store(tmp_path).pull(ref, insecure=True,
                                progress=lambda d, done, total: seen.__setitem__(d, (done, total)))
    want = src_store.get("local/layered:1")
    assert img.digest == want.digest and img.id == want.id
    assert img.ref == ref and len(img.layers) == 3
    assert {ly.digest for ly in img.layers} == set(seen)
    assert all(done == total for done, total in seen.values())


def test_https_to_plain_http_registry_fails_clearly(registry: Registry, layout: Path,
                                                    tmp_path: Path) -> None:
    ref = registry.push(layout, "v1", "plain")
    with pytest.raises(rootfs.RegistryError, match="insecure=True"):
        _store(tmp_path).pull(ref)


def test_tls_with_ca_path_and_bytes(tls_registry: Registry, layout: Path, tmp_path: Path) -> None:
    ref = tls_registry.push(layout, "v1", "tls/v")
    assert tls_registry.ca_pem is not None
    with pytest.raises(rootfs.RegistryError, match=r"TLS verification .* failed"):
        _store(tmp_path, "a").pull(ref)
    a = _store(tmp_path, "b").pull(ref, ca_certs=tls_registry.ca_pem)
    b = _store(tmp_path, "c").pull(ref, ca_certs=tls_registry.ca_pem.read_bytes())
    assert a.digest == b.digest
    with pytest.raises(rootfs.RegistryError, match="cannot load CA certificates"):
        _store(tmp_path, "d").pull(ref, ca_certs=tmp_path / "missing.pem")


def test_basic_auth(auth_registry: Registry, layout: Path, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    ref = auth_registry.push(layout, "v1", "private/v")
    ca = auth_registry.ca_pem
    img = _store(tmp_path, "a").pull(ref, ca_certs=ca, auth=RegistryAuth("alice", "wonderland"))
    assert img.layers
    with pytest.raises(rootfs.AuthError, match="denied user 'alice'"):
        _store(tmp_path, "b").pull(ref, ca_certs=ca, auth=("alice", "wrong"))
    with pytest.raises(rootfs.AuthError, match="requires credentials"):
        _store(tmp_path, "c").pull(ref, ca_certs=ca)


def test_docker_config_credentials_fallback(auth_registry: Registry, layout: Path,
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ref = auth_registry.push(layout, "v2", "private/cfg")
    cfg = tmp_path / "dockercfg"
    cfg.mkdir()
    token = base64.b64encode(b"alice:wonderland").decode()
    (cfg / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
    img = _store(tmp_path).pull(ref, ca_certs=auth_registry.ca_pem)
    assert img.layers


def test_bearer_token_auth(tmp_path_factory: pytest.TempPathFactory, layout: Path,
                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_binaries("/usr/bin/docker-registry", "skopeo")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
    reg = Registry(tmp_path_factory.mktemp("token-reg"), tls=True, user="bob", password="builder",
                   token=True).start()
    try:
        ref = reg.push(layout, "layered", "tok/layered")
        img = _store(tmp_path, "a").pull(ref, ca_certs=reg.ca_pem, auth=("bob", "builder"))
        assert len(img.layers) == 3
        with pytest.raises(rootfs.AuthError, match="token server refused user 'bob'"):
            _store(tmp_path, "b").pull(ref, ca_certs=reg.ca_pem, auth=("bob", "nope"))
        with pytest.raises(rootfs.AuthError, match="anonymous"):
            _store(tmp_path, "c").pull(ref, ca_certs=reg.ca_pem)
    finally:
        reg.stop()


def test_multi_arch_index_resolves_platform(registry: Registry, layout: Path,
                                            src_store: rootfs.ImageStore, tmp_path: Path) -> None:
    ref = registry.push(layout, "multi", "multi/app", all_platforms=True)
    amd = _store(tmp_path, "a").pull(ref, insecure=True)
    assert amd.digest == src_store.get("local/layered:1").digest
    assert amd.platform == "linux/amd64"
    arm = _store(tmp_path, "b").pull(ref, insecure=True, platform="linux/arm64")
    assert arm.digest == src_store.get("local/layered:arm").digest
    with pytest.raises(rootfs.ImageNotFoundError, match=r"no linux/s390x image \(available: "
                                                        r"linux/amd64, linux/arm64\)"):
        _store(tmp_path, "c").pull(ref, insecure=True, platform="linux/s390x")


def test_pull_policies(registry: Registry, layout: Path, src_store: rootfs.ImageStore,
                       tmp_path: Path) -> None:
    store = _store(tmp_path)
    ref = f"{registry.host}/pol/app:current"
    with pytest.raises(rootfs.ImageNotFoundError, match="policy=never"):
        store.pull(ref, insecure=True, policy="never")
    with pytest.raises(rootfs.RootfsError, match="bad pull policy 'sometimes'"):
        store.pull(ref, insecure=True, policy="sometimes")  # type: ignore[arg-type]
    registry.push(layout, "v1", "pol/app", dest_tag="current")
    first = store.pull(ref, insecure=True)
    assert first.digest == src_store.get("local/v:1").digest
    registry.push(layout, "v2", "pol/app", dest_tag="current")  # the tag moves
    assert store.pull(ref, insecure=True).digest == first.digest  # if-missing: local copy
    assert store.pull(ref, insecure=True, policy="never").digest == first.digest
    refreshed = store.pull(ref, insecure=True, policy="always")
    assert refreshed.digest == src_store.get("local/v:2").digest
    assert store.get(ref).digest == refreshed.digest


def test_if_missing_needs_no_network(store: rootfs.ImageStore,
                                     busybox_image: rootfs.Image) -> None:
    # Tagged under a registry that does not exist: if-missing must not contact it.
    store.tag("127.0.0.1:9/offline/busybox:1", busybox_image.digest)
    img = store.pull("127.0.0.1:9/offline/busybox:1", insecure=True)
    assert img.digest == busybox_image.digest


def test_pull_by_digest(registry: Registry, layout: Path, src_store: rootfs.ImageStore,
                        tmp_path: Path) -> None:
    registry.push(layout, "v1", "dig/app")
    d = src_store.get("local/v:1").digest
    img = _store(tmp_path).pull(f"{registry.host}/dig/app@{d}", insecure=True)
    assert img.digest == d


def test_missing_image_and_bad_reference(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(rootfs.ImageNotFoundError, match="not found in the registry"):
        _store(tmp_path).pull(f"{registry.host}/nope/nothing:1", insecure=True)
    with pytest.raises(rootfs.InvalidReferenceError, match="bad repository component 'Bad'"):
        _store(tmp_path).pull(f"{registry.host}/Bad:1", insecure=True)


def test_corrupted_blob_is_detected_and_not_stored(tmp_path_factory: pytest.TempPathFactory,
                                                   layout: Path, src_store: rootfs.ImageStore,
                                                   tmp_path: Path) -> None:
    require_binaries("/usr/bin/docker-registry", "skopeo")
    reg = Registry(tmp_path_factory.mktemp("corrupt-reg")).start()
    try:
        ref = reg.push(layout, "layered", "bad/layered")
        victim = src_store.get("local/layered:1").layers[1]
        path = reg.blob_data_path(victim.digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        store = _store(tmp_path)
        with pytest.raises(rootfs.DigestError, match=f"expected {victim.digest}"):
            store.pull(ref, insecure=True)
        assert not store.has_blob(victim.digest)
        assert store.list() == []
        assert list((store.home / "tmp").iterdir()) == []
    finally:
        reg.stop()


def test_transient_errors_are_retried(registry: Registry, layout: Path, tmp_path: Path) -> None:
    registry.push(layout, "v1", "flaky/app")
    proxy = FlakyProxy(registry.port, failures=2)
    try:
        img = _store(tmp_path).pull(f"{proxy.host}/flaky/app:v1", insecure=True)
        assert img.layers and proxy.seen >= 3
    finally:
        proxy.stop()


def test_connection_dropped_mid_blob_is_retried(registry: Registry, tmp_path: Path) -> None:
    src = rootfs.ImageStore(tmp_path / "src")
    big = rootfs.image_from_layers(src, "local/big:1", [
        layer(E("blob", data=os.urandom(3 << 20))), layer(E("small", data=b"s"))])
    rootfs.write_oci_layout(src, tmp_path / "big-layout", {"big": big})
    registry.push(tmp_path / "big-layout", "big", "cut/big")
    proxy = FlakyProxy(registry.port, failures=0, cut_after=1 << 20)
    try:
        img = _store(tmp_path).pull(f"{proxy.host}/cut/big:big", insecure=True)
        assert img.digest == big.digest and proxy.cuts == 1
    finally:
        proxy.stop()


def test_concurrent_pulls_share_the_work(registry: Registry, layout: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ref = registry.push(layout, "layered", "conc/layered")
    fetched: list[str] = []
    real = rootfs.RegistryClient.fetch_blob

    def counting(self: rootfs.RegistryClient, repo: str, digest: str, *a: object,
                 **kw: object) -> int:
        fetched.append(digest)
        return real(self, repo, digest, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(rootfs.RegistryClient, "fetch_blob", counting)
    store = _store(tmp_path)
    results: list[rootfs.Image] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(rootfs.ImageStore(store.home).pull(ref, insecure=True))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4
    assert len({r.digest for r in results}) == 1
    assert len(fetched) == len(set(fetched)) == 4  # config + 3 layers, each fetched once


def test_unpack_matches_umoci(registry: Registry, layout: Path, tmp_path: Path) -> None:
    require_root()
    require_binaries("umoci", "skopeo")
    ref = registry.push(layout, "layered", "cmp/layered")
    store = _store(tmp_path)
    img = store.pull(ref, insecure=True)
    ours = tmp_path / "ours"
    store.unpack(img, ours)
    oci = tmp_path / "oci"
    subprocess.run(["skopeo", "--policy", str(policy_file(tmp_path)), "copy", "-q",
                    "--src-tls-verify=false", f"docker://{ref}", f"oci:{oci}:x"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{oci}:x", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    theirs = tmp_path / "bundle" / "rootfs"

    def tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                st = os.lstat(p)
                content = os.readlink(p) if p.is_symlink() else (
                    p.read_text() if p.is_file() else "")
                out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, content)
        return out

    assert tree(ours) == tree(theirs)
    shutil.rmtree(tmp_path / "bundle")


def test_hostile_image_from_registry_is_refused_and_leaves_nothing(
        registry: Registry, tmp_path: Path) -> None:
    src = rootfs.ImageStore(tmp_path / "src")
    evil = rootfs.image_from_layers(src, "local/evil:1", [
        layer(E("etc", "dir"), E("etc/ok", data=b"fine")),
        # (an absolute "/" link would resolve inside the image root: rootfs._walk)
        layer(E("escape", "symlink", link="../../../../../.."),
              E("escape/root/.ssh/authorized_keys", data=b"ssh-ed25519 AAAA attacker")),
    ])
    rootfs.write_oci_layout(src, tmp_path / "evil-layout", {"evil": evil})
    ref = registry.push(tmp_path / "evil-layout", "evil", "evil/img")
    store = _store(tmp_path)
    img = store.pull(ref, insecure=True)
    dest = tmp_path / "dest"
    with pytest.raises(rootfs.UnsafeLayerError, match=r"escape/root/\.ssh/authorized_keys"):
        store.unpack(img, dest)
    assert not dest.exists()
    with pytest.raises(rootfs.UnsafeLayerError):
        store.prepare(img, upper_size_mib=16)
    assert list((store.home / "rootfs").iterdir()) == []
    assert list((store.home / "disks").iterdir()) == []
    assert list((store.home / "prepared").iterdir()) == []
    assert list((store.home / "tmp").iterdir()) == []
    assert not Path("/root/.ssh/authorized_keys").exists() or \
        b"attacker" not in Path("/root/.ssh/authorized_keys").read_bytes()
