"""An "upstream internet" for sandbox tests: a network namespace with TEST-NET servers.

::

    host: routes 198.51.100.0/24 and 203.0.113.0/24 -> veth mvuT -> netns mvu-T
      lo 198.51.100.10: HTTP :80, HTTPS :443 (trustme CA: ``Upstream.ca_file``),
         certificate for web/api/other.upstream.test and the address
      lo 198.51.100.53: DNS :53 (UDP + TCP), the zone below
      (nothing answers on 203.0.113.0/24: the routed "other" TEST-NET hosts)

The servers reuse ``tests.netstack_gateway.upstream_servers`` (``/auth`` echoes the
``Authorization`` header it received) and log every request they get, as one JSON line
(method, path, Host, Authorization) in ``Upstream.request_log``: what reached the
origin, seen from its side. A sandbox's TAP uplink NATs its guest into the host
namespace, whose routes lead here; nothing leaves the host.

Runs as root. The host routes are host-wide: while another test's upstream namespace
routes the same TEST-NET prefixes (``tests/netstack_gateway``, metric 0), ours (metric
4242) would not be used, so setting up waits until the host routes them to us.

Example::

    with Upstream(tmp_path) as up:
        ...  # a sandbox with DnsOptions(nameservers=(UPSTREAM_DNS_IP,)) resolves ZONE names
        print(up.requests())
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

UPSTREAM_IP = "198.51.100.10"
UPSTREAM_DNS_IP = "198.51.100.53"
UPSTREAM_NETS = ("198.51.100.0/24", "203.0.113.0/24")
#: a routed TEST-NET address nothing answers on (a host no rule allows)
UNLISTED_IP = "203.0.113.7"
NAMES = ("web.upstream.test", "api.upstream.test", "other.upstream.test")
ZONE = "".join(f"{n}. 60 IN A {UPSTREAM_IP}\n" for n in NAMES)
_REPO = Path(__file__).resolve().parents[2]
ROUTE_METRIC = 4242


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check, timeout=30)


class Upstream:
    """The upstream namespace and its servers (see the module docstring); :meth:`close`
    removes everything, also when the setup failed half-way."""

    def __init__(self, workdir: Path, *, route_wait: float = 120.0) -> None:
        import trustme

        self.token = f"{os.getpid() % 0xFFFF:04x}s"
        self.netns = f"mvu-{self.token}"
        self.veth = f"mvu{self.token}"
        base = 4 * (os.getpid() % 16000)
        self.host_end = f"10.214.{base // 256}.{base % 256 + 1}"
        self.ns_end = f"10.214.{base // 256}.{base % 256 + 2}"
        self.workdir = workdir
        self.request_log = workdir / "requests.jsonl"
        self.servers: subprocess.Popen[str] | None = None
        self._routes: list[str] = []
        self._created = False
        ca = trustme.CA()
        cert = ca.issue_cert(*NAMES, UPSTREAM_IP)
        self.ca_file = workdir / "upstream-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self._cert, self._key = workdir / "upstream-cert.pem", workdir / "upstream-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(self._cert))
        cert.private_key_pem.write_to_path(str(self._key))
        try:
            self._setup(route_wait)
        except BaseException:
            self.close()
            raise

    def _setup(self, route_wait: float) -> None:
        _ip("netns", "add", self.netns)
        self._created = True
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "up0",
            "netns", self.netns)
        _ip("addr", "add", f"{self.host_end}/30", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        n = ("-n", self.netns)
        _ip(*n, "link", "set", "lo", "up")
        for addr in (UPSTREAM_IP, UPSTREAM_DNS_IP):
            _ip(*n, "addr", "add", f"{addr}/32", "dev", "lo")
        _ip(*n, "addr", "add", f"{self.ns_end}/30", "dev", "up0")
        _ip(*n, "link", "set", "up0", "up")
        # no default route in there: the upstream can only answer; replies leave from
        # the "public" address
        _ip(*n, "route", "replace", f"{self.host_end.rsplit('.', 1)[0]}."
            f"{int(self.host_end.rsplit('.', 1)[1]) - 1}/30", "dev", "up0", "src", UPSTREAM_IP)
        # a metric of our own: a concurrent gateway test's routes (metric 0) are never
        # refused because of ours; while one exists, its upstream would get our traffic,
        # so wait until the host routes our TEST-NET addresses to us
        for net in UPSTREAM_NETS:
            r = _ip("route", "add", net, "via", self.ns_end, "dev", self.veth,
                    "metric", str(ROUTE_METRIC), check=False)
            if r.returncode != 0:
                raise RuntimeError(f"cannot route {net} to the upstream namespace: "
                                   f"{r.stderr.strip()} (another sandbox test's upstream?)")
            self._routes.append(net)
        deadline = time.monotonic() + route_wait
        while True:
            dev = [_ip("-j", "route", "get", ip).stdout for ip in (UPSTREAM_IP, UNLISTED_IP)]
            if all(f'"dev":"{self.veth}"' in d for d in dev):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the host routes TEST-NET elsewhere ({dev}): another "
                                   f"test's upstream namespace is up")
            time.sleep(0.5)
        self.servers = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m",
             "tests.microvm.sandbox_upstream", "--cert", str(self._cert), "--key",
             str(self._key), "--log", str(self.request_log)],
            cwd=_REPO, stdout=subprocess.PIPE, text=True)
        assert self.servers.stdout is not None
        line = self.servers.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"upstream servers did not start (got {line!r})")

    def requests(self) -> list[dict[str, Any]]:
        """Every request the HTTP(S) servers received so far, oldest first.

        Example::

            [r["path"] for r in up.requests()]
        """
        if not self.request_log.exists():
            return []
        return [json.loads(line) for line in self.request_log.read_text().splitlines() if line]

    def close(self) -> None:
        """Stop the servers, delete the routes, the veth and the namespace (idempotent)."""
        if self.servers is not None:
            self.servers.kill()
            self.servers.wait(10)
            if self.servers.stdout:
                self.servers.stdout.close()
            self.servers = None
        for net in self._routes:
            _ip("route", "del", net, "via", self.ns_end, "dev", self.veth, "metric",
                str(ROUTE_METRIC), check=False)
        self._routes = []
        _ip("link", "del", self.veth, check=False)
        if self._created:
            _ip("netns", "del", self.netns, check=False)
            self._created = False

    def __enter__(self) -> Upstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    """Serve HTTP/HTTPS/DNS inside the upstream namespace; print ``ready``."""
    import ssl

    from tests.netstack_gateway import upstream_servers as us
    from tests.netstack_gateway.dns_server import AuthServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    lock = threading.Lock()
    log_path = Path(args.log)

    class Logged(us.Handler):
        def _record(self) -> None:
            entry = {"method": self.command, "path": self.path,
                     "host": self.headers.get("Host"),
                     "authorization": self.headers.get("Authorization"),
                     "tls": isinstance(self.connection, ssl.SSLSocket)}
            with lock, log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

        def do_GET(self) -> None:
            self._record()
            super().do_GET()

        def do_PUT(self) -> None:
            self._record()
            super().do_PUT()

    us.Handler = Logged  # type: ignore[misc]  # serve() builds its servers with it
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    us.serve(UPSTREAM_IP, 80)
    us.serve(UPSTREAM_IP, 443, ctx)
    AuthServer(ZONE, UPSTREAM_DNS_IP, 53)
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
