"""Fixtures for rootfs tests: stores, a busybox-static source tree, real registries."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from tests.rootfs._registry import Registry
from tests.support import require_binaries


def make_busybox_tree(dest: Path) -> Path:
    """A tiny root: /bin/busybox (Debian busybox-static) + applet symlinks + /etc files."""
    (dest / "bin").mkdir(parents=True)
    (dest / "etc").mkdir()
    (dest / "tmp").mkdir(mode=0o1777)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy("/bin/busybox", dest / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo"):
        os.symlink("busybox", dest / "bin" / applet)
    (dest / "etc" / "motd").write_text("welcome\n")
    (dest / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    os.chmod(dest / "etc" / "hosts", 0o640)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return dest


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_binaries("/bin/busybox")
    return make_busybox_tree(tmp_path_factory.mktemp("bb") / "root")


@pytest.fixture
def store(tmp_path: Path) -> rootfs.ImageStore:
    return rootfs.ImageStore(tmp_path / "store")


@pytest.fixture
def busybox_image(store: rootfs.ImageStore, busybox_tree: Path) -> rootfs.Image:
    return rootfs.build_image(busybox_tree, "local/busybox:test", store,
                              config={"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]})


def _registry(tmp_path_factory: pytest.TempPathFactory, **kw: object) -> Iterator[Registry]:
    require_binaries("/usr/bin/docker-registry", "skopeo", "htpasswd")
    reg = Registry(tmp_path_factory.mktemp("registry"), **kw)  # type: ignore[arg-type]
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Plain-HTTP registry (pulled with insecure=True)."""
    yield from _registry(tmp_path_factory)


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """TLS registry with a trustme CA (pulled with ca_certs=)."""
    yield from _registry(tmp_path_factory, tls=True)


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """TLS + htpasswd (bcrypt) registry; user alice / password wonderland."""
    yield from _registry(tmp_path_factory, tls=True, user="alice", password="wonderland")
