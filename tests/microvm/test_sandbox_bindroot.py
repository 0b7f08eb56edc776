"""A local directory as the image: served as the guest's root over virtio-fs (a bind
root), patched in place, and written through by the guest (real guest, QEMU TCG)."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm import Sandbox
from rootfs import Patch
from tests.microvm.sandbox_fixtures import busybox_tree, sandbox_home_fixture

__all__ = ["sandbox_home_fixture"]

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_directory_image_is_a_live_root(sandbox_home: Path, tmp_path: Path) -> None:
    root = busybox_tree(tmp_path / "root")
    sb = Sandbox.create("bindroot", image=root, network="none", replace=True,
                        patches=[Patch.text("/etc/from-patch", "patched\n")])
    try:
        assert (root / "etc/from-patch").read_text() == "patched\n"   # patched in place
        out = sb.shell("cat /etc/from-patch; mount | grep ' / '; echo guest > /root/from-guest")
        assert out.success, out.stderr_text
        assert "patched" in out.stdout_text and "virtiofs" in out.stdout_text
        assert (root / "root/from-guest").read_text() == "guest\n"     # written through
        (root / "root/from-host").write_text("host\n")
        assert sb.fs.read_text("/root/from-host") == "host\n"
    finally:
        Sandbox.remove("bindroot")
    assert root.is_dir() and (root / "bin/busybox").exists()           # the directory stays
