"""The command line (``python -m tls_proxy``) and transparent mode (lookup callback, and
``SO_ORIGINAL_DST`` behind a real nftables redirect in a network namespace)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trustme

from tests.support import require_binaries, require_root
from tests.tls_proxy.helpers import header, read_response
from tls_proxy import TlsProxy

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


def _start_cli(args: list[str], env: dict[str, str] | None = None,
               prefix: list[str] | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "tls_proxy", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if lines[-1] == "tls_proxy: ready":
            break
    return proc, lines


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_cli_prints_placeholders_and_ca_then_proxies(tmp_path, upstream, upstream_ca_pem):
    require_binaries("curl")
    ca_dir = tmp_path / "ca"
    proc, lines = _start_cli(
        ["--listen", "127.0.0.1:0", "--ca-dir", str(ca_dir),
         "--secret", "API_KEY=cli-real-value@api.example.test",
         "--secret", "FROM_ENV=@api.example.test",
         "--upstream-ca", upstream_ca_pem, "--resolve", "api.example.test=127.0.0.1"],
        env={"FROM_ENV": "env-real-value"},
    )
    try:
        assert f"tls_proxy: CA certificate {ca_dir / 'ca.crt'}" in lines, lines
        assert "API_KEY=$MSB_API_KEY" in lines and "FROM_ENV=$MSB_FROM_ENV" in lines
        assert all("real-value" not in ln for ln in lines)
        port = int(next(ln for ln in lines if "listening on" in ln).rsplit(":", 1)[1])
        assert oct((ca_dir / "ca.key").stat().st_mode & 0o777) == "0o600"
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{port}",
             "--cacert", str(ca_dir / "ca.crt"), "-H", "A: $MSB_API_KEY",
             "-H", "B: $MSB_FROM_ENV", f"https://api.example.test:{upstream.port}/e"],
            capture_output=True, text=True, timeout=30,
        )
        echo = json.loads(out.stdout)
        assert header(echo, "A") == ["cli-real-value"]
        assert header(echo, "B") == ["env-real-value"]
    finally:
        _stop(proc)
    assert proc.stderr is not None
    assert "real-value" not in proc.stderr.read()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--listen", "127.0.0.1:0", "--ca-dir", "{d}", "--secret", "BAD"], "ENV=VALUE@HOST"),
        (["--listen", "127.0.0.1:0", "--ca-dir", "{d}", "--secret", "K=v@exa mple"],
         "invalid host pattern"),
        (["--listen", "nope", "--ca-dir", "{d}"], "invalid --listen"),
        (["--listen", "127.0.0.1:0", "--ca-dir", "{d}", "--resolve", "a.test=999.1.1.1"],
         "invalid --resolve address"),
        (["--ca-dir", "{d}"], "give --listen"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, args, needle):
    args = [a.replace("{d}", str(tmp_path)) for a in args]
    out = subprocess.run([sys.executable, "-m", "tls_proxy", *args], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 2
    assert needle in out.stderr, out.stderr


def test_transparent_mode_with_lookup_callback(proxy_ca_dir, upstream_ca_pem, upstream, ca_cert):
    from tests.tls_proxy.conftest import make_config

    proxy = TlsProxy(make_config(proxy_ca_dir, upstream_ca_pem))
    loop = asyncio.new_event_loop()
    seen: list[tuple[str, int]] = []

    def lookup(peer, local):
        seen.append(peer)
        return ("127.0.0.1", upstream.port)

    port_box: list[int] = []
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        port_box.append(loop.run_until_complete(
            proxy.listen_transparent("127.0.0.1", 0, lookup))[1])
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    try:
        ctx = ssl.create_default_context(cafile=ca_cert)
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port_box[0])),
                             server_hostname="api.example.test") as s:
            s.sendall(b"GET /t HTTP/1.1\r\nHost: api.example.test\r\nX: $MSB_API_KEY\r\n\r\n")
            st, _, body = read_response(s, bytearray())
        assert st == 200 and header(json.loads(body), "X") == ["real-api-key-123"]
        assert len(seen) == 1
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_transparent_so_original_dst_with_nftables(tmp_path, family):
    require_root()
    require_binaries("ip", "nft", "curl")
    v6 = family == "ipv6"
    ns = f"tlsp{os.getpid()}{family[-1]}"
    vip, real = ("2001:db8::10", "2001:db8::11") if v6 else ("203.0.113.10", "203.0.113.11")
    ca = trustme.CA()
    cert = ca.issue_cert("api.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "up.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "up.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "upca.pem"))
    procs: list[subprocess.Popen[str]] = []
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nsx = ["ip", "netns", "exec", ns]
        plen = "128" if v6 else "32"
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{vip}/{plen}", "dev", "lo"],
                    ["ip", "addr", "add", f"{real}/{plen}", "dev", "lo"]):
            subprocess.run([*nsx, *cmd], check=True)
        fam = "ip6" if v6 else "ip"
        rules = (f"table {fam} tlsp {{\n chain out {{\n  type nat hook output priority -100;\n"
                 f"  {fam} daddr {vip} tcp dport 443 redirect to :8443\n }}\n}}\n")
        subprocess.run([*nsx, "nft", "-f", "-"], input=rules, text=True, check=True)
        time.sleep(1.5 if v6 else 0)  # IPv6 DAD on lo-bound addresses
        up = subprocess.Popen(
            [*nsx, sys.executable, "-m", "benchmarks._tls_proxy_upstream", "--cert",
             str(tmp_path / "up.crt"), "--key", str(tmp_path / "up.key"), "--host",
             real, "--port", "443"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(up)
        assert up.stdout is not None and up.stdout.readline().strip() == "443"
        listen = "[::1]:8443" if v6 else "127.0.0.1:8443"
        proc, lines = _start_cli(
            ["--transparent", listen, "--ca-dir", str(tmp_path / "ca"),
             "--secret", "API_KEY=ns-real@api.example.test", "--upstream-ca",
             str(tmp_path / "upca.pem"), "--resolve", f"api.example.test={real}"],
            prefix=nsx)
        procs.append(proc)
        assert any("transparent on" in ln for ln in lines), lines
        resolve = f"api.example.test:443:[{vip}]" if v6 else f"api.example.test:443:{vip}"
        out = subprocess.run(
            [*nsx, "curl", "-sS", "--max-time", "20", "--cacert", str(tmp_path / "ca/ca.crt"),
             "--resolve", resolve, "-H", "X: $MSB_API_KEY", "https://api.example.test/e"],
            capture_output=True, text=True, timeout=30)
        echo = json.loads(out.stdout) if out.stdout.startswith("{") else None
        assert echo is not None, (out, lines)
        assert header(echo, "X") == ["ns-real"], out
    finally:
        for p in procs:
            _stop(p)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(tmp_path, ignore_errors=True)


def _one_request_via(parser, proxy_ca_dir, upstream_ca_pem, upstream, ca_cert):
    from tests.tls_proxy.conftest import ProxyThread, make_config

    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem, hello_parser=parser))
    try:
        from tests.tls_proxy.helpers import tls_tunnel

        s = tls_tunnel(pt.port, "api.example.test", upstream.port, ca_cert)
        s.sendall(b"GET /n HTTP/1.1\r\nHost: api.example.test\r\nX: $MSB_API_KEY\r\n\r\n")
        st, _, body = read_response(s, bytearray())
        s.close()
        return st, json.loads(body)
    finally:
        pt.stop()


def test_injected_netstack_hello_parser(proxy_ca_dir, upstream_ca_pem, upstream, ca_cert):
    try:
        from netstack import parse_client_hello as ns_parse
    except ImportError as e:  # the C extension is built by setup.sh
        pytest.skip(f"netstack.parse_client_hello not importable: {e}")
    calls: list[int] = []

    def parser(data: bytes):
        calls.append(len(data))
        return ns_parse(data)

    st, echo = _one_request_via(parser, proxy_ca_dir, upstream_ca_pem, upstream, ca_cert)
    assert st == 200 and header(echo, "X") == ["real-api-key-123"] and calls


def test_injected_parser_that_raises_closes_cleanly(proxy_ca_dir, upstream_ca_pem, upstream,
                                                    ca_cert):
    def broken(data: bytes):
        raise RuntimeError("parser bug")

    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _one_request_via(broken, proxy_ca_dir, upstream_ca_pem, upstream, ca_cert)


def test_update_secrets_applies_to_new_connections(proxy_ca_dir, upstream_ca_pem, upstream,
                                                   ca_cert):
    from tests.tls_proxy.conftest import ProxyThread, make_config
    from tests.tls_proxy.helpers import tls_tunnel
    from tls_proxy import Secret

    pt = ProxyThread(make_config(proxy_ca_dir, upstream_ca_pem))
    try:
        def one() -> list[str]:
            s = tls_tunnel(pt.port, "api.example.test", upstream.port, ca_cert)
            s.sendall(b"GET /r HTTP/1.1\r\nHost: api.example.test\r\nX: $MSB_API_KEY\r\n\r\n")
            _, _, body = read_response(s, bytearray())
            s.close()
            return header(json.loads(body), "X")

        assert one() == ["real-api-key-123"]
        pt.proxy.update_secrets([Secret("API_KEY", "rotated-value", ["api.example.test"])])
        assert one() == ["rotated-value"]
    finally:
        pt.stop()


def test_default_ca_dir_honours_microvm_home(tmp_path, monkeypatch):
    from tls_proxy import default_ca_dir

    monkeypatch.setenv("MICROVM_HOME", str(tmp_path))
    assert default_ca_dir() == tmp_path / "tls"


def test_injected_parser_returning_bad_sni_is_closed(proxy_ca_dir, upstream_ca_pem, upstream,
                                                     ca_cert):
    from tls_proxy import ClientHello

    def liar(data: bytes):
        return ClientHello("api.example.test:443/../x", ())

    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _one_request_via(liar, proxy_ca_dir, upstream_ca_pem, upstream, ca_cert)
