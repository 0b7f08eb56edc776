"""``microvm.Sandbox`` end to end, network side: a real guest (QEMU; TCG here) behind the
real gateway, TLS proxy and TAP uplink, talking to a real upstream namespace
(``tests/microvm/sandbox_upstream.py``: TEST-NET HTTP/HTTPS/DNS servers), and images
pulled from a real local ``docker-registry``.

Boots are few: one sandbox without a NIC, pulled from the registry (tests 1 and 5 of
issue 11), and one shared by the network tests: a domain allowlist (web + api
.upstream.test), a secret for web.upstream.test, a published port. The error paths need
no boot and run first, while ``$MICROVM_HOME`` is still empty. The module's
``sandbox_home`` fixture then checks that nothing is left: processes, namespaces,
links, nft tables, records, directories.

The guest's HTTP client is busybox ``wget`` (its built-in TLS does not verify
certificates; Debian's static build crashes with ``-T`` and on a refused connection, so
the tests use no ``-T`` and probe refusals with ``nc``); Debian's ``openssl`` (with its shared libraries) is copied into the
image to prove the guest's trust store verifies the proxy's certificates.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from microvm import DnsOptions, Sandbox, TlsOptions
from microvm.errors import NoUplinkError, SandboxConfigError
from netstack import NetworkPolicy, PolicyError, Rule
from tests.microvm.sandbox_fixtures import (
    add_dynamic_binary,
    busybox_image,
    busybox_tree,
    leftover_kernel_objects,
    owned_processes,
    sandbox_home_fixture,  # noqa: F401
)
from tests.microvm.sandbox_upstream import UNLISTED_IP, UPSTREAM_DNS_IP, UPSTREAM_IP, Upstream
from tests.support import require_binaries, require_root

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(300)]

SECRET = "s3cret-Value-42"
WEB, API, OTHER = "web.upstream.test", "api.upstream.test", "other.upstream.test"
NET_NAME, NONE_NAME = "sbnetallow", "sbnetnone"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _allowlist() -> NetworkPolicy:
    # two names allowed (TCP, any port); DNS for anything else is NXDOMAIN, addresses no
    # DNS answer named are reset
    return NetworkPolicy.custom(rules=[Rule.allow(WEB, protocol="tcp"),
                                       Rule.allow(API, protocol="tcp")])


def _nothing_started(home: Path, name: str) -> None:
    assert [i.name for i in Sandbox.list()] == []
    root = home / "sandboxes"
    assert not root.exists() or list(root.iterdir()) == []
    assert owned_processes(home) == []
    assert leftover_kernel_objects({name}) == []


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A plain-HTTP docker-registry on 127.0.0.1 (pulled with ``registry_insecure``)."""
    require_binaries("/usr/bin/docker-registry", "skopeo")
    from tests.rootfs._registry import Registry

    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    require_root()
    require_binaries("ip", "nft")
    with Upstream(tmp_path_factory.mktemp("upstream")) as up:
        yield up


@pytest.fixture(scope="module")
def net_sb(sandbox_home: Path, upstream: Upstream, kernel: object,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, int]]:
    """The shared network sandbox: allowlist, one secret, port HOST -> 80; yields it and
    the host port."""
    require_binaries("qemu-system-x86_64", "/usr/bin/openssl")
    tree = busybox_tree(tmp_path_factory.mktemp("netbox") / "root")
    add_dynamic_binary(tree, "/usr/bin/openssl")
    (tree / "var" / "www" / "index.html").write_text("hello from the guest httpd\n")
    img = busybox_image(rootfs.ImageStore(), "local/netbox:1", tree=tree,
                        config={"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"]})
    port = _free_port()
    sb = Sandbox.create(
        NET_NAME, image=img, network=_allowlist(), ports={port: 80},
        secrets=[{"env": "TOK", "value": SECRET, "host": WEB}],
        dns=DnsOptions(nameservers=(UPSTREAM_DNS_IP,), rebind_protection=False),
        tls=TlsOptions(upstream_ca_certs=(str(upstream.ca_file),)))
    try:
        yield sb, port
    finally:
        sb.stop()
        Sandbox.remove(NET_NAME)
        assert owned_processes(sandbox_home) == []
        assert leftover_kernel_objects({NET_NAME}) == []


def _sh(sb: Sandbox, script: str, timeout: float = 60) -> tuple[int, str]:
    """Exit code and output of ``script``; a failed command's output carries the tail of
    the supervisor's log (gateway, proxy) for the assertion message."""
    r = sb.shell(script, timeout=timeout)
    out = r.stdout_text + r.stderr_text
    if r.exit_code != 0:
        out += "\n--- supervisor log tail ---\n" + sb.logs(tail=15, source="supervisor")
    return r.exit_code, out


# -- 6. errors before anything starts (no boot; first, while the home is empty) ------------
def test_secret_for_a_host_the_policy_denies_is_refused(sandbox_home: Path) -> None:
    with pytest.raises(SandboxConfigError, match=r"secret TOK: the network policy denies "
                                                 r"every host it is for \(evil\.example\.com\)"):
        Sandbox.create("sberr1", image="local/none:1", network=_allowlist(),
                       secrets=[{"env": "TOK", "value": SECRET, "host": "evil.example.com"}])
    _nothing_started(sandbox_home, "sberr1")


def test_ports_without_a_network_are_refused(sandbox_home: Path) -> None:
    with pytest.raises(SandboxConfigError, match="ports need a network"):
        Sandbox.create("sberr2", image="local/none:1", network="none", ports={18080: 80})
    _nothing_started(sandbox_home, "sberr2")


@pytest.mark.parametrize("bad", [{"bogus": 1}, "no-such-preset",
                                 {"rules": [{"action": "maybe"}]}])
def test_policy_error_passes_through(sandbox_home: Path, bad: object) -> None:
    with pytest.raises(PolicyError):
        Sandbox.create("sberr3", image="local/none:1", network=bad)
    _nothing_started(sandbox_home, "sberr3")


def test_unknown_image_in_the_registry(sandbox_home: Path, registry: object, kernel: object
                                       ) -> None:
    require_binaries("qemu-system-x86_64")
    ref = f"{registry.host}/nope/missing:1"  # type: ignore[attr-defined]
    with pytest.raises(rootfs.ImageNotFoundError, match=r"nope/missing.* not found"):
        Sandbox.create("sberr4", image=ref, registry_insecure=True, network="none")
    _nothing_started(sandbox_home, "sberr4")


def test_no_uplink_is_refused_unless_network_none(sandbox_home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    require_binaries("qemu-system-x86_64")
    import microvm.sandbox._netwiring as nw

    monkeypatch.setattr(nw, "can_create_tap", lambda: False)  # as an unprivileged process
    monkeypatch.setattr(nw, "find_passt", lambda *a: None)    # without passt
    with pytest.raises(NoUplinkError, match="network='none'"):
        Sandbox.create("sberr5", image="local/none:1", network="public_only")
    _nothing_started(sandbox_home, "sberr5")


# -- 1 + 5. pull from the registry; network none ---------------------------------------------
def test_registry_pull_exec_default_and_no_nic(sandbox_home: Path, registry: object,
                                               kernel: object, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    require_binaries("qemu-system-x86_64")
    src = rootfs.ImageStore(tmp_path / "src")
    img = busybox_image(src, "local/bbreg:1", config={
        "Cmd": ["/bin/sh", "-c", "echo cmd:$GREETING:$(pwd)"],
        "Env": ["PATH=/bin", "GREETING=hello-from-config"], "WorkingDir": "/tmp"})
    layout = tmp_path / "oci"
    rootfs.write_oci_layout(src, layout, {"v1": img})
    ref = registry.push(layout, "v1", "team/bbreg")  # type: ignore[attr-defined]
    # no uplink can be built here, and none is needed: the guest gets no NIC
    import microvm.sandbox._netwiring as nw

    monkeypatch.setattr(nw, "can_create_tap", lambda: False)
    with Sandbox.create(NONE_NAME, image=ref, registry_insecure=True, network="none") as sb:
        assert sb.state == "running"
        assert rootfs.ImageStore().get(ref).digest == img.digest  # pulled into the home
        assert sb.exec_default().stdout_text == "cmd:hello-from-config:/tmp\n"
        out = sb.exec("/bin/sh", ["-c", "echo $GREETING"])
        assert out.stdout_text == "hello-from-config\n"
        # no NIC: only software interfaces (lo, and the kernel's dummy0), no eth0
        rc, out_text = _sh(sb, "for i in /sys/class/net/*; do echo ${i##*/} "
                               "$([ -e $i/device ] && echo nic || echo soft); done")
        ifaces = dict(line.split() for line in out_text.splitlines())
        assert rc == 0 and "lo" in ifaces and "eth0" not in ifaces, out_text
        assert set(ifaces.values()) == {"soft"}, out_text
        rc, out_text = _sh(sb, "ip route; wget -q -O - http://198.51.100.10/ 2>&1; "
                               "echo rc=$?")
        assert "default" not in out_text and not out_text.endswith("rc=0\n"), out_text
        assert sb.published_ports() == {} and sb.network.stats() == {}
        assert sb.network.policy == NetworkPolicy.none()
        assert leftover_kernel_objects({NONE_NAME}) == []  # no uplink was built
    assert [i.name for i in Sandbox.list()] == []
    assert owned_processes(sandbox_home) == []


# -- 2. the domain allowlist, from inside the guest -------------------------------------------
def test_allowlisted_name_resolves_and_answers(net_sb: tuple[Sandbox, int]) -> None:
    sb, _ = net_sb
    # -type=a: busybox nslookup sends A and AAAA with the same query id and pairs the
    # answers up wrongly when AAAA's comes first (the gateway answers both correctly)
    rc, out = _sh(sb, f"cat /etc/resolv.conf; nslookup -type=a {WEB}")
    assert rc == 0 and re.search(rf"Name:\s+{re.escape(WEB)}\s+Address: {UPSTREAM_IP}", out), out
    server = re.search(r"nameserver (\S+)", out)
    assert server and server.group(1) != UPSTREAM_DNS_IP, out  # the gateway's forwarder
    rc, out = _sh(sb, f"wget -q -O - http://{WEB}/allowed")
    assert rc == 0 and out.startswith("hello from upstream /allowed client="), out


def test_other_name_is_nxdomain(net_sb: tuple[Sandbox, int], upstream: Upstream) -> None:
    sb, _ = net_sb
    before = sb.network.stats()["dns"]["denied"]
    # the upstream server knows this name: the NXDOMAIN is the gateway's policy answer
    rc, out = _sh(sb, f"nslookup -type=a {OTHER}")
    assert rc != 0 and "NXDOMAIN" in out and UPSTREAM_IP not in out, out
    rc, out = _sh(sb, f"wget -q -O - http://{OTHER}/ 2>&1; echo rc=$?")
    assert "rc=0" not in out and "hello" not in out, out
    assert sb.network.stats()["dns"]["denied"] > before


def test_direct_ip_and_metadata_are_refused_fast(net_sb: tuple[Sandbox, int]) -> None:
    sb, _ = net_sb
    rst_before = sb.network.stats()["rst_sent"]
    # nc -w 20: a silently dropped SYN would read "timed out" after 20 s; the gateway's
    # RST reads "Connection refused" at once (busybox wget crashes on a refused connect)
    for ip in (UNLISTED_IP, "169.254.169.254"):
        t0 = time.monotonic()
        _, out = _sh(sb, f"nc -w 20 {ip} 80 </dev/null; echo rc=$?")
        took = time.monotonic() - t0
        assert "Connection refused" in out and "rc=1\n" in out, (ip, out)
        assert took < 15, (ip, took)
    assert sb.network.stats()["rst_sent"] >= rst_before + 2
    from netstack import Flow

    assert sb.network.evaluate(Flow("egress", "tcp", "169.254.169.254", 80)).action != "allow"


# -- 3. the secret, seen from the upstream's side --------------------------------------------
def test_guest_sees_only_the_placeholder(net_sb: tuple[Sandbox, int]) -> None:
    sb, _ = net_sb
    rc, out = _sh(sb, 'echo "[$TOK]"; env; cat /proc/1/environ')
    assert rc == 0 and "[$MSB_TOK]" in out and SECRET not in out, out


def test_secret_substituted_for_its_host(net_sb: tuple[Sandbox, int], upstream: Upstream
                                         ) -> None:
    sb, _ = net_sb
    n0 = len(upstream.requests())
    rc, out = _sh(sb, f'wget -q -O - --header "Authorization: Bearer $TOK" '
                      f'https://{WEB}/auth')
    assert rc == 0 and out == f"auth=Bearer {SECRET}\n", out
    got = upstream.requests()[n0:]
    assert [(r["path"], r["host"], r["authorization"], r["tls"]) for r in got] == \
        [("/auth", WEB, f"Bearer {SECRET}", True)], got


def test_placeholder_blocked_for_another_allowed_host(net_sb: tuple[Sandbox, int],
                                                      upstream: Upstream) -> None:
    sb, _ = net_sb
    n0 = len(upstream.requests())
    rc, out = _sh(sb, f'wget -O - --header "Authorization: Bearer $TOK" '
                      f'https://{API}/auth 2>&1')
    assert rc != 0 and "403 Forbidden" in out, out
    assert upstream.requests()[n0:] == []  # nothing reached the origin
    # the host itself is allowed: the same request without the placeholder goes through
    rc, out = _sh(sb, f"wget -q -O - https://{API}/plain")
    assert rc == 0 and out.startswith("hello from upstream /plain"), out
    got = upstream.requests()[n0:]
    assert [(r["path"], r["host"], r["authorization"]) for r in got] == \
        [("/plain", API, None)], got
    assert not any("MSB_" in str(r["authorization"]) for r in upstream.requests())


def test_guest_trust_store_verifies_the_proxy(net_sb: tuple[Sandbox, int],
                                              sandbox_home: Path, upstream: Upstream) -> None:
    sb, _ = net_sb
    ca_pem = (sandbox_home / "tls" / "ca.crt").read_text().strip()
    bundle = sb.fs.read_text("/etc/ssl/certs/ca-certificates.crt")
    assert ca_pem in bundle
    # a verifying client (openssl, the guest's bundle, errors fatal) through the proxy
    request = (f"GET /auth HTTP/1.1\\r\\nHost: {WEB}\\r\\nAuthorization: Bearer $TOK\\r\\n"
               f"Connection: close\\r\\n\\r\\n")
    rc, out = _sh(sb, f'printf "{request}" | /usr/bin/openssl s_client -quiet '
                      f"-verify_return_error -CAfile /etc/ssl/certs/ca-certificates.crt "
                      f"-connect {WEB}:443 -servername {WEB} 2>&1")
    assert rc == 0 and "verify return:1" in out and "microvm-sandbox CA" in out, out
    assert f"auth=Bearer {SECRET}" in out, out
    # the guest never sees the origin's certificate: trusting only the origin's CA fails
    sb.fs.write("/tmp/origin-ca.pem", upstream.ca_file.read_bytes())
    rc, out = _sh(sb, f"/usr/bin/openssl s_client -verify_return_error -CAfile "
                      f"/tmp/origin-ca.pem -connect {WEB}:443 -servername {WEB} </dev/null 2>&1")
    assert rc != 0 and "verify error" in out and "microvm-sandbox CA" in out, out


# -- 4. a published port reaching a server in the guest ---------------------------------------
def test_published_port_reaches_a_guest_server(net_sb: tuple[Sandbox, int]) -> None:
    sb, port = net_sb
    assert sb.published_ports() == {"tcp:80": port}
    h = sb.exec_stream("/bin/httpd", ["-f", "-p", "80", "-h", "/var/www"])
    try:
        deadline = time.monotonic() + 60
        while "0.0.0.0:80 " not in sb.shell("netstat -ltn").stdout_text.replace(":::80 ",
                                                                                 "0.0.0.0:80 "):
            assert time.monotonic() < deadline, "httpd did not listen"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30) as r:
            assert r.status == 200 and r.read() == b"hello from the guest httpd\n"
        accepted = sb.network.stats()["published"]["accepted"]
        assert accepted >= 1
    finally:
        h.kill()
        h.wait(timeout=30)
    # nothing listens any more: the connection is refused or closed, never answered
    with pytest.raises((ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=30).read()

