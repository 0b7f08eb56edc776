"""tls_proxy benchmark: ours vs mitmproxy vs the direct path, same upstream, same client.

Measures keep-alive requests/s with header substitution, p50/p99 added latency,
new-connection handshakes/s (CONNECT + TLS + one request), and leaf minting/s.
mitmproxy runs from a private venv (``vendor/mitmproxy-venv``, created on first run)
with an equivalent header-rewriting addon; if that venv cannot be created the
mitmproxy comparison is skipped with a message.

Run: ``python -m benchmarks.tls_proxy [--quick] [--no-mitmproxy]`` (last line: one JSON
object; keys ending in ``_ratio`` are ours/mitmproxy, > 1 = we are better). As a
pytest-benchmark module: ``pytest benchmarks/tls_proxy.py``.

Every CA and leaf private key the run creates (ours, mitmproxy's, the upstream's) lives
in one private temporary directory that is removed when the run ends, also on SIGTERM,
SIGHUP or Ctrl-C: no private key outlives the benchmark process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "vendor" / "mitmproxy-venv"
HOST = "api.example.test"
PLACEHOLDER = "$MSB_API_KEY"
VALUE = "bench-real-value"
REQUEST = (f"GET /e HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {PLACEHOLDER}\r\n"
           "User-Agent: bench\r\n\r\n").encode()
_CL = re.compile(rb"content-length:\s*(\d+)", re.I)


def log(msg: str) -> None:
    print(f"[tls_proxy bench] {msg}", file=sys.stderr, flush=True)


# ----- processes -------------------------------------------------------------------


def ensure_mitm_venv() -> Path | None:
    """``vendor/mitmproxy-venv/bin/mitmdump``, creating the venv on first use; None if impossible."""
    mitmdump = VENV / "bin" / "mitmdump"
    if mitmdump.exists():
        return mitmdump
    log(f"creating {VENV} and installing mitmproxy (first run only)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300,
                       capture_output=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "mitmproxy"], check=True,
                       timeout=900, capture_output=True)
    except (subprocess.SubprocessError, OSError) as e:
        log(f"SKIPPING the mitmproxy comparison: cannot create {VENV}: {e}")
        return None
    return mitmdump if mitmdump.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


class Rig:
    """Upstream + our proxy + (optionally) mitmdump, each in its own process."""

    def __init__(self, work: Path, with_mitm: bool = True) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[str]] = []
        try:
            self._start(with_mitm)
        except BaseException:
            self.close()
            raise

    def _start(self, with_mitm: bool) -> None:
        import trustme

        work = self.work
        ca = trustme.CA()
        leaf = ca.issue_cert(HOST)
        self.up_ca = str(work / "upca.pem")
        ca.cert_pem.write_to_path(self.up_ca)
        leaf.cert_chain_pems[0].write_to_path(str(work / "up.crt"))
        leaf.private_key_pem.write_to_path(str(work / "up.key"))
        up = self._spawn([sys.executable, "-m", "benchmarks._tls_proxy_upstream", "--cert",
                          str(work / "up.crt"), "--key", str(work / "up.key")])
        assert up.stdout is not None
        self.up_port = int(up.stdout.readline())
        ours = self._spawn([sys.executable, "-m", "tls_proxy", "--listen", "127.0.0.1:0",
                            "--ca-dir", str(work / "ours"), "--secret",
                            f"API_KEY={VALUE}@{HOST}", "--upstream-ca", self.up_ca,
                            "--resolve", f"{HOST}=127.0.0.1"])
        assert ours.stdout is not None
        self.ours_port = 0
        for line in ours.stdout:
            if "listening on" in line:
                self.ours_port = int(line.rsplit(":", 1)[1])
            if line.strip() == "tls_proxy: ready":
                break
        self.ours_ca = str(work / "ours" / "ca.crt")
        self.mitm_port: int | None = None
        self.mitm_ca: str | None = None
        mitmdump = ensure_mitm_venv() if with_mitm else None
        if mitmdump:
            port = free_port()
            conf = work / "mitm"
            env = {**os.environ, "BENCH_HOST": HOST, "BENCH_UPSTREAM": f"127.0.0.1:{self.up_port}",
                   "BENCH_PLACEHOLDER": PLACEHOLDER, "BENCH_VALUE": VALUE}
            self._spawn([str(mitmdump), "--listen-host", "127.0.0.1", "-p", str(port), "-q",
                         "--set", f"confdir={conf}", "--set",
                         f"ssl_verify_upstream_trusted_ca={self.up_ca}",
                         "-s", str(ROOT / "benchmarks" / "_tls_proxy_mitm_addon.py")], env=env)
            try:
                wait_port(port)
            except RuntimeError as e:
                log(f"SKIPPING the mitmproxy comparison: mitmdump did not start: {e}")
            else:
                self.mitm_port = port
                self.mitm_ca = str(conf / "mitmproxy-ca-cert.pem")

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             cwd=ROOT, env=env)
        self.procs.append(p)
        return p

    def paths(self) -> dict[str, tuple[int | None, str]]:
        """name -> (proxy port or None for direct, CA file the client trusts)."""
        out: dict[str, tuple[int | None, str]] = {"direct": (None, self.up_ca),
                                                  "ours": (self.ours_port, self.ours_ca)}
        if self.mitm_port and self.mitm_ca:
            out["mitmproxy"] = (self.mitm_port, self.mitm_ca)
        return out

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# ----- client ----------------------------------------------------------------------


def open_conn(rig: Rig, proxy: int | None, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    if proxy is None:
        raw = socket.create_connection(("127.0.0.1", rig.up_port), timeout=30)
    else:
        raw = socket.create_connection(("127.0.0.1", proxy), timeout=30)
        raw.sendall(f"CONNECT {HOST}:{rig.up_port} HTTP/1.1\r\nHost: {HOST}:{rig.up_port}"
                    "\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = raw.recv(4096)
            if not d:
                raise ConnectionError("proxy closed the CONNECT")
            buf += d
        if not buf.startswith(b"HTTP/1.1 200") and not buf.startswith(b"HTTP/1.0 200"):
            raise ConnectionError(f"CONNECT refused: {buf[:80]!r}")
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw, server_hostname=HOST)


def roundtrip(s: ssl.SSLSocket, buf: bytearray) -> bytes:
    s.sendall(REQUEST)
    while True:
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            m = _CL.search(buf, 0, i)
            n = int(m.group(1)) if m else 0
            end = i + 4 + n
            if len(buf) >= end:
                body = bytes(buf[i + 4 : end])
                del buf[:end]
                return body
        d = s.recv(65536)
        if not d:
            raise ConnectionError("closed mid-response")
        buf += d


def client_ctx(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def check_substitution(rig: Rig, proxy: int | None, cafile: str) -> bool:
    s = open_conn(rig, proxy, client_ctx(cafile))
    try:
        echo = json.loads(roundtrip(s, bytearray()))
    finally:
        s.close()
    return ["Authorization", f"Bearer {VALUE}"] in echo["headers"]


def keepalive_rps(rig: Rig, proxy: int | None, cafile: str, conns: int, seconds: float) -> float:
    ctx = client_ctx(cafile)
    counts = [0] * conns
    stop = time.monotonic() + seconds
    start_evt = threading.Barrier(conns + 1)

    def worker(k: int) -> None:
        s = open_conn(rig, proxy, ctx)
        buf = bytearray()
        roundtrip(s, buf)
        start_evt.wait()
        n = 0
        while time.monotonic() < stop:
            roundtrip(s, buf)
            n += 1
        counts[k] = n
        s.close()

    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conns)]
    for t in ts:
        t.start()
    start_evt.wait()
    t0 = time.monotonic()
    for t in ts:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def latencies(rig: Rig, proxy: int | None, cafile: str, n: int) -> list[float]:
    s = open_conn(rig, proxy, client_ctx(cafile))
    buf = bytearray()
    for _ in range(20):
        roundtrip(s, buf)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        roundtrip(s, buf)
        out.append(time.perf_counter() - t)
    s.close()
    return out


def handshakes(rig: Rig, proxy: int | None, cafile: str, conns: int, seconds: float) -> float:
    ctx = client_ctx(cafile)
    counts = [0] * conns
    stop = time.monotonic() + seconds

    def worker(k: int) -> None:
        n = 0
        while time.monotonic() < stop:
            s = open_conn(rig, proxy, ctx)
            roundtrip(s, bytearray())
            s.close()
            n += 1
        counts[k] = n

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


def pct(xs: list[float], p: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(p / 100 * len(ys)))]


# ----- leaf minting ----------------------------------------------------------------


def ours_minting(seconds: float) -> tuple[float, float]:
    from tls_proxy import CertificateAuthority

    ca = CertificateAuthority.generate()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ca.mint_leaf(f"h{n}.example.test")
        n += 1
    mint = n / (time.perf_counter() - t0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ca.server_context(f"c{n}.example.test")
        n += 1
    return mint, n / (time.perf_counter() - t0)


MITM_MINT = """
import sys, time
from cryptography import x509
from mitmproxy.certs import CertStore
store = CertStore.from_store(sys.argv[2], "mitmproxy", 2048)
secs = float(sys.argv[1]); n = 0; t0 = time.perf_counter()
while time.perf_counter() - t0 < secs:
    name = f"h{n}.example.test"
    store.get_cert(name, [x509.DNSName(name)])
    n += 1
print(n / (time.perf_counter() - t0))
"""


def mitm_minting(seconds: float, confdir: Path) -> float | None:
    """mitmproxy's leaf minting rate; its CA (with private key) goes into ``confdir``,
    which the caller owns and removes."""
    py = VENV / "bin" / "python"
    if not py.exists():
        return None
    confdir.mkdir(mode=0o700, exist_ok=True)
    out = subprocess.run([str(py), "-c", MITM_MINT, str(seconds), str(confdir)],
                         capture_output=True, text=True, timeout=120)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log(f"mitmproxy minting failed: {out.stderr[-500:]}")
        return None


# ----- driver ----------------------------------------------------------------------


def run(quick: bool, with_mitm: bool = True) -> dict[str, Any]:
    secs = 2.0 if quick else 8.0
    nlat = 300 if quick else 2000
    conns = 4
    res: dict[str, Any] = {"quick": quick, "connections": conns, "seconds_per_figure": secs}
    # one private directory holds every key of the run; removed on exit and on signals
    with tempfile.TemporaryDirectory(prefix="tlsbench-") as d:
        _measure(Path(d), res, secs, nlat, conns, with_mitm)
    return res


def _measure(work: Path, res: dict[str, Any], secs: float, nlat: int, conns: int,
             with_mitm: bool) -> None:
    (work / "rig").mkdir()
    rig = Rig(work / "rig", with_mitm=with_mitm)
    try:
        paths = rig.paths()
        if "mitmproxy" not in paths:
            log("mitmproxy comparison skipped (no venv); ratios omitted")
        for name, (port, ca) in paths.items():
            if name != "direct":
                res[f"{name}_substitutes"] = check_substitution(rig, port, ca)
        lat: dict[str, list[float]] = {}
        for name, (port, ca) in paths.items():
            log(f"{name}: keep-alive requests/s")
            res[f"{name}_keepalive_rps"] = round(keepalive_rps(rig, port, ca, conns, secs), 1)
            lat[name] = latencies(rig, port, ca, nlat)
            res[f"{name}_p50_ms"] = round(statistics.median(lat[name]) * 1e3, 3)
            res[f"{name}_p99_ms"] = round(pct(lat[name], 99) * 1e3, 3)
            log(f"{name}: new-connection handshakes/s")
            res[f"{name}_handshakes_per_s"] = round(handshakes(rig, port, ca, conns, secs), 1)
        for name in paths:
            if name == "direct":
                continue
            for p in ("p50", "p99"):
                res[f"{name}_added_{p}_ms"] = round(
                    max(res[f"{name}_{p}_ms"] - res[f"direct_{p}_ms"], 0.001), 3)
    finally:
        rig.close()
    log("leaf minting")
    mint, ctx_rate = ours_minting(secs / 2)
    res["ours_leaf_mint_per_s"] = round(mint, 1)
    res["ours_leaf_context_per_s"] = round(ctx_rate, 1)
    mm = mitm_minting(secs / 2, work / "mitm-mint") if with_mitm else None
    if mm:
        res["mitmproxy_leaf_mint_per_s"] = round(mm, 1)
        res["leaf_mint_ratio"] = round(mint / mm, 2)
    if "mitmproxy_keepalive_rps" in res:
        res["keepalive_rps_ratio"] = round(res["ours_keepalive_rps"]
                                           / res["mitmproxy_keepalive_rps"], 2)
        res["handshakes_ratio"] = round(res["ours_handshakes_per_s"]
                                        / res["mitmproxy_handshakes_per_s"], 2)
        for p in ("p50", "p99"):
            res[f"added_{p}_latency_ratio"] = round(
                res[f"mitmproxy_added_{p}_ms"] / res[f"ours_added_{p}_ms"], 2)
    res["ours_vs_direct_rps_fraction"] = round(res["ours_keepalive_rps"]
                                               / res["direct_keepalive_rps"], 3)


def exit_on_signals() -> None:
    """Turn SIGTERM/SIGHUP into ``SystemExit`` so ``finally`` blocks and temporary
    directories clean up (Ctrl-C already raises ``KeyboardInterrupt``); a second signal
    during the clean-up is ignored rather than cutting it short."""

    def handler(signum: int, _frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (under a minute)")
    ap.add_argument("--no-mitmproxy", action="store_true",
                    help="measure ours and the direct path only")
    a = ap.parse_args()
    exit_on_signals()
    res = run(a.quick, with_mitm=not a.no_mitmproxy)
    print(json.dumps(res))


# ----- pytest-benchmark --------------------------------------------------------------


def test_mint_leaf(benchmark: Any) -> None:
    from tls_proxy import CertificateAuthority

    ca = CertificateAuthority.generate()
    names = iter(f"n{i}.example.test" for i in range(10**7))
    benchmark(lambda: ca.mint_leaf(next(names)))


def test_server_context_cached(benchmark: Any) -> None:
    from tls_proxy import CertificateAuthority

    ca = CertificateAuthority.generate()
    ca.server_context("a.example.test")
    benchmark(lambda: ca.server_context("a.example.test"))


def test_keepalive_request_through_ours(benchmark: Any) -> None:
    # not tmp_path: pytest keeps those after the run, with the keys inside
    with tempfile.TemporaryDirectory(prefix="tlsbench-") as d:
        rig = Rig(Path(d), with_mitm=False)
        try:
            s = open_conn(rig, rig.ours_port, client_ctx(rig.ours_ca))
            buf = bytearray()
            assert b"bench-real-value" in roundtrip(s, buf)
            benchmark(lambda: roundtrip(s, buf))
            s.close()
        finally:
            rig.close()


if __name__ == "__main__":
    main()
