"""One real guest created by an unprivileged user: ``Sandbox.create(network="public_only")``
in a process that is ``nobody`` (``tests.support.unprivileged_argv``), with its own
``$MICROVM_HOME``. Nothing forces the uplink: the sandbox picks passt by itself because
it may not create a TAP. The guest reaches a host-side test server (the upstream
namespace root set up, reached through the host's routes by passt's sockets), a private
address is refused by the gateway, a secret is substituted by the TLS proxy for its host
(TLS steered to the proxy by the gateway's NAT: no nftables), and nothing of passt or
the sandbox is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.microvm.sandbox_upstream import NAMES, UPSTREAM_DNS_IP, UPSTREAM_IP, Upstream
from tests.support import (
    NOBODY,
    NOGROUP,
    pids_named,
    require_binaries,
    require_root,
    unprivileged_argv,
)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(420)]
ROOT = Path(__file__).resolve().parents[2]

_GUEST = r"""
import json, sys, time
from pathlib import Path
import rootfs
from microvm import DnsOptions, Sandbox, TlsOptions
from microvm.sandbox._netwiring import can_create_tap
from tests.microvm.sandbox_fixtures import add_dynamic_binary, busybox_image, busybox_tree

out = {"tap_possible": can_create_tap()}
# busybox's wget speaks TLS through openssl s_client when there is one (its own TLS
# client does not get along with the proxy's minted certificates)
tree = busybox_tree(Path(sys.argv[5]) / "root")
add_dynamic_binary(tree, "/usr/bin/openssl")
img = busybox_image(rootfs.ImageStore(), "local/rootless:1", tree=tree,
                    config={"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"]})
sb = Sandbox.create("rootless", image=img, network="public_only",
                    secrets=[{"env": "TOK", "value": "s3cret-rootless", "host": sys.argv[3]}],
                    dns=DnsOptions(nameservers=(sys.argv[2],), rebind_protection=False),
                    tls=TlsOptions(upstream_ca_certs=(sys.argv[4],)))
try:
    r = sb.shell(f"wget -q -O - http://{sys.argv[1]}/rootless-guest")
    out["wget"] = [r.exit_code, r.stdout_text + r.stderr_text]
    t0 = time.monotonic()
    r = sb.shell("nc -w 20 10.1.2.3 80 </dev/null; echo rc=$?")
    out["private"] = [r.stdout_text + r.stderr_text, time.monotonic() - t0]
    r = sb.shell(f'wget -q -O - --header "Authorization: Bearer $TOK" https://{sys.argv[3]}/auth')
    out["secret"] = [r.exit_code, r.stdout_text + r.stderr_text]
    st = sb.network.stats()
    out["stats"] = {"rst_sent": st["rst_sent"], "to_guest": st["to_guest"],
                    "steered": st["steering"]["flows"], "claimed": st["steering"]["claimed"]}
    if out["wget"][0] != 0 or out["secret"][0] != 0:
        out["logs"] = sb.logs(tail=30, source="supervisor")
finally:
    sb.stop()
    Sandbox.remove("rootless")
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    require_root()
    require_binaries("ip", "passt", "qemu-system-x86_64", "setpriv", "unshare",
                     "/usr/bin/openssl")
    with Upstream(tmp_path_factory.mktemp("upstream")) as up:
        yield up


def _passt_pids_of(uid: int) -> set[int]:
    out = set()
    for pid in pids_named("passt"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if os.stat(f"/proc/{pid}").st_uid == uid:
                out.add(pid)
    return out


def test_an_unprivileged_user_runs_a_public_only_sandbox_through_passt(
        upstream: Upstream, kernel: object) -> None:
    before = _passt_pids_of(NOBODY)
    home = Path(tempfile.mkdtemp(prefix="mvhome-nobody-"))
    os.chown(home, NOBODY, NOGROUP)
    env = {k: v for k, v in os.environ.items() if k not in ("MICROVM_UPLINK",)}
    env.update(HOME=str(home), TMPDIR=str(home), MICROVM_HOME=str(home / "mv"),
               PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    try:
        ca = home / "upstream-ca.pem"   # the upstream's test CA, readable by the user
        ca.write_bytes(Path(upstream.ca_file).read_bytes())
        os.chown(ca, NOBODY, NOGROUP)
        r = subprocess.run(unprivileged_argv([sys.executable, "-c", _GUEST, UPSTREAM_IP,
                                              UPSTREAM_DNS_IP, NAMES[0], str(ca),
                                              str(home)]),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                           check=False)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        assert r.returncode == 0 and lines, (r.returncode, r.stdout[-3000:], r.stderr[-5000:])
        out = json.loads(lines[-1][len("RESULT "):])
        assert out["tap_possible"] is False  # the sandbox had to pick passt itself
        rc, text = out["wget"]
        assert rc == 0 and text.startswith("hello from upstream /rootless-guest"), out
        text, took = out["private"]
        assert "Connection refused" in text and took < 15, out
        assert out["stats"]["rst_sent"] >= 1 and out["stats"]["to_guest"] > 0, out
        rc, text = out["secret"]   # substituted by the proxy, for its host only
        assert rc == 0 and text == "auth=Bearer s3cret-rootless\n", out
        st = out["stats"]
        assert st["steered"] >= 1 and st["claimed"] == st["steered"], out
        assert not _passt_pids_of(NOBODY) - before, "passt left running"
        # nothing of the sandbox left under the user's home but its (empty) registry
        left = [str(p) for p in (home / "mv").rglob("*") if "/sandboxes/" in str(p)]
        assert not left, left
    finally:
        shutil.rmtree(home, ignore_errors=True)
