"""A real guest on the rootless uplink: ``Sandbox`` with ``network="public_only"`` over
passt (``MICROVM_UPLINK=passt`` forces the uplink an unprivileged user gets, since this
test process is root), reaching a host-side test server; a private address is refused
by the gateway; a published port (passt's listener on 127.0.0.1, ingress-checked by the
gateway) reaches a server in the guest; nothing of passt is left after the sandbox is
removed.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from microvm import Sandbox
from tests.microvm.sandbox_fixtures import (
    assert_nothing_left,
    busybox_image,
    sandbox_home_fixture,  # noqa: F401
)
from tests.microvm.sandbox_upstream import UPSTREAM_IP, Upstream
from tests.support import pids_named, require_binaries, require_root

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]
NAME = "sbpasst"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    require_root()
    require_binaries("ip", "nft", "passt", "qemu-system-x86_64")
    with Upstream(tmp_path_factory.mktemp("upstream")) as up:
        yield up


def test_public_only_guest_reaches_a_host_server_through_passt(
        sandbox_home: Path, upstream: Upstream, kernel: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROVM_UPLINK", "passt")
    before = pids_named("passt")
    img = busybox_image(rootfs.ImageStore(), "local/passtbox:1",
                        config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sb = Sandbox.create(NAME, image=img, network="public_only", ports={port: 80})
    try:
        assert pids_named("passt") - before, "the sandbox's uplink is not passt"
        r = sb.shell(f"wget -q -O - http://{UPSTREAM_IP}/through-passt")
        out = r.stdout_text + r.stderr_text
        assert r.exit_code == 0 and out.startswith("hello from upstream /through-passt"), \
            out + sb.logs(tail=15, source="supervisor")
        t0 = time.monotonic()
        r = sb.shell("nc -w 20 10.1.2.3 80 </dev/null; echo rc=$?")
        out = r.stdout_text + r.stderr_text
        assert "Connection refused" in out and time.monotonic() - t0 < 15, out
        stats = sb.network.stats()
        assert stats["rst_sent"] >= 1 and stats["to_guest"] > 0, stats
        # the published port: passt forwards 127.0.0.1:port to the guest's httpd
        assert sb.published_ports() == {"tcp:80": port}
        sb.shell("mkdir -p /tmp/www && echo hello from the guest > /tmp/www/index.html")
        h = sb.exec_stream("/bin/httpd", ["-f", "-p", "80", "-h", "/tmp/www"])
        try:
            deadline = time.monotonic() + 60
            while ":80 " not in sb.shell("netstat -ltn").stdout_text:
                assert time.monotonic() < deadline, "httpd did not listen"
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30) as r:
                assert r.status == 200 and r.read() == b"hello from the guest\n"
        finally:
            h.kill()
            h.wait(timeout=30)
    finally:
        sb.stop()
        Sandbox.remove(NAME)
    deadline = time.monotonic() + 5
    while pids_named("passt") - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids_named("passt") - before, "passt left running"
    assert_nothing_left(sandbox_home, {NAME})
