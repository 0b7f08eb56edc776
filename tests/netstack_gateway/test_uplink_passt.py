"""The passt uplink: argument checks, passt's lifecycle (own session, dies with its
stream, nothing left behind), a gateway run entirely as an unprivileged user, published
ports through passt's forwards (ingress-checked by the C loop), DNS over TCP refused
with a RST, and large transfers both ways. The shared scenarios (policy, DNS, SNI,
deny lists, rebinding, exfiltration) run over passt in test_gateway_e2e.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netstack import NetworkPolicy, Rule
from netstack.errors import GatewayError, UplinkError
from netstack.gateway import AddressPlan, Gateway, PasstUplink
from netstack.gateway._uplink_passt import passt_argv
from tests.netstack_gateway.topology import (
    UPSTREAM_DNS_IP,
    UPSTREAM_IP,
    Topology,
    uplink_and_topology,
)
from tests.support import GUEST_HTTP_SERVER, NOBODY, NOGROUP, require_binaries, require_root

pytestmark = pytest.mark.timeout(90)


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


# -- no passt needed ---------------------------------------------------------------------
def test_argv_carries_the_plan_and_the_forwards() -> None:
    plan = AddressPlan(7, ipv6=True)
    argv = passt_argv(plan, 9, published_ports=[], ipv6_egress=True, host_loopback=True)
    assert argv[argv.index("--fd") + 1] == "9"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-a"] == \
        [str(plan.guest_ipv4), str(plan.guest_ipv6)]
    assert argv[argv.index("--mac-addr") + 1] == plan.gateway_mac
    assert "--no-map-gw" not in argv and "--ipv4-only" not in argv
    argv = passt_argv(plan, 9, runas="1000:1000")
    assert "--ipv4-only" in argv and "--no-map-gw" in argv
    assert argv[argv.index("--runas") + 1] == "1000:1000"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"plan": "172.16.0.2"}, "plan must be an AddressPlan"),
    ({"ipv6_egress": "yes"}, "ipv6_egress must be"),
    ({"ipv6_egress": True}, "needs a plan with IPv6"),
    ({"runas": "no body"}, "runas must be"),
    ({"published_ports": "8080:80"}, "list of mappings"),
    ({"published_ports": ["0:80"]}, "fixed host port"),
    ({"binary": "/nonexistent/passt"}, "passt not found"),
])
def test_bad_arguments_are_typed_errors_before_passt_starts(kwargs: dict[str, object],
                                                            message: str) -> None:
    args: dict[str, object] = {"plan": AddressPlan(9)}
    args.update(kwargs)
    with pytest.raises(UplinkError, match=message):
        PasstUplink(**args)  # type: ignore[arg-type]


# -- passt itself ------------------------------------------------------------------------
@pytest.fixture
def passt() -> None:
    require_binaries("passt")


def test_passt_runs_in_its_own_session_and_goes_away(passt: None) -> None:
    up = PasstUplink(AddressPlan(9))
    pid = up.pid
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    if os.geteuid() == 0:  # passt drops root to nobody by itself
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] == str(NOBODY), uid_line
    assert not up.closed and up.tap_fd >= 0
    with pytest.raises(GatewayError, match="forwards published ports itself"):
        Gateway(NetworkPolicy.none(), uplink=PasstUplink(AddressPlan(10),
                                                         published_ports=["18080:80"]),
                guest_fd=0, published_ports=["18081:80"], own_uplink=True)
    up.close()
    up.close()
    assert up.closed and _gone(pid)
    with pytest.raises(UplinkError, match="closed"):
        _ = up.tap_fd


def test_passt_dies_with_its_owner_even_on_sigkill(passt: None) -> None:
    """The owner is SIGKILLed: its end of the stream closes and passt exits (no orphan)."""
    code = ("import sys; from netstack.gateway import AddressPlan, PasstUplink; "
            "up = PasstUplink(AddressPlan(11)); print(up.pid, flush=True); "
            "sys.stdin.read()")
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        assert not _gone(pid, 0.1)
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert _gone(pid), "passt outlived its owner"
    finally:
        owner.kill()
        owner.wait(10)


# -- end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    require_root()
    require_binaries("ip", "nft", "curl", "dig", "passt")
    tmp = tmp_path_factory.mktemp("passt")
    with uplink_and_topology("gw-passt", AddressPlan(3224), tmp, "p", kind="passt") as (
            uplink, topo):
        uplink.close()  # each test brings its own passt
        yield topo


def _curl(topo: Topology, *args: str, max_time: int = 8) -> tuple[int, str]:
    r = topo.run_in_guest(["curl", "-sS", "--max-time", str(max_time), *args],
                          timeout=max_time + 10)
    return r.returncode, r.stdout + r.stderr


def _gateway(topo: Topology, up: PasstUplink, policy: NetworkPolicy) -> Gateway:
    assert topo.vmm_socket is not None
    return Gateway(policy, uplink=up, guest_fd=topo.vmm_socket.fileno(),
                   dns_upstreams=[UPSTREAM_DNS_IP], rebind_protection=False)


def test_a_gateway_run_by_an_unprivileged_user(topo: Topology) -> None:
    """The whole gateway (C loop, DNS forwarder, passt) in a process that is nobody:
    the guest reaches the public upstream and is refused a private address."""
    r_fd, w_fd = os.pipe()
    stop_r, stop_w = os.pipe()
    assert topo.vmm_socket is not None
    guest_fd = topo.vmm_socket.fileno()
    pid = os.fork()
    if pid == 0:  # the unprivileged child: no Python imports from here on
        code = 1
        try:
            os.close(r_fd)
            os.close(stop_w)
            os.setgroups([])
            os.setresgid(NOGROUP, NOGROUP, NOGROUP)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            up = PasstUplink(AddressPlan(3224))
            gw = Gateway(NetworkPolicy.public_only(), uplink=up, guest_fd=guest_fd,
                         dns_upstreams=[UPSTREAM_DNS_IP], own_uplink=True)
            os.write(w_fd, f"ready {os.geteuid()} {up.pid}\n".encode())
            os.read(stop_r, 1)
            st = gw.stats()
            gw.close()
            os.write(w_fd, f"done {st['rst_sent']} {st['to_guest']}\n".encode())
            code = 0
        except BaseException as e:  # reported to the parent
            os.write(w_fd, f"error {type(e).__name__}: {e}\n".encode())
        finally:
            os._exit(code)
    os.close(w_fd)
    os.close(stop_r)
    try:
        with os.fdopen(r_fd, "r") as rd:
            first = rd.readline().split()
            assert first[:2] == ["ready", str(NOBODY)], first
            passt_pid = int(first[2])
            rc, out = _curl(topo, f"http://{UPSTREAM_IP}/rootless")
            assert rc == 0 and out.startswith("hello from upstream /rootless"), out
            rc, out = _curl(topo, "http://10.1.2.3/")
            assert rc == 7, out  # RST from the gateway
            os.write(stop_w, b"x")
            last = rd.readline().split()
            assert last[0] == "done" and int(last[1]) >= 1 and int(last[2]) > 0, last
    finally:
        os.close(stop_w)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _gone(passt_pid), "passt left running"


def test_dns_over_tcp_is_steered_to_the_forwarder(topo: Topology) -> None:
    """No namespace to DNAT in: the gateway's steering NAT sends guest TCP/53 (any
    address) to its loopback listeners, which claim the address the guest asked."""
    with PasstUplink(topo.plan) as up, \
            _gateway(topo, up, NetworkPolicy.public_only()) as gw:
        gw_ip = str(topo.plan.gateway_ipv4)
        for server in (gw_ip, "10.9.8.7"):   # ours, then a resolver in a denied group
            r = topo.run_in_guest(["dig", f"@{server}", "+time=3", "+tries=1", "+tcp",
                                   "web.upstream.test", "A"])
            want = "status: NOERROR" if server == gw_ip else "status: NXDOMAIN"
            assert want in r.stdout, r.stdout + r.stderr
        r = topo.run_in_guest(["dig", f"@{gw_ip}", "+time=3", "+tries=1", "+short",
                               "web.upstream.test", "A"])
        assert r.stdout.strip() == UPSTREAM_IP, r.stdout + r.stderr
        st = gw.stats()
        assert st["steering"]["flows"] == 2 and st["steering"]["claimed"] == 2, st
        assert st["dns"]["forwarded"] == 2 and st["dns"]["denied"] == 1, st["dns"]




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_published_port_through_passt_is_ingress_checked(topo: Topology) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", topo.guest_ns, sys.executable, "-c",
                             GUEST_HTTP_SERVER, str(topo.plan.guest_ipv4)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        port = _free_port()
        allow = NetworkPolicy.public_only()
        deny = NetworkPolicy.custom(rules=[
            Rule.deny(direction="ingress", protocol="tcp", port=8000),
            Rule.allow(destination="198.51.100.0/24")])
        for policy, ok in ((allow, True), (deny, False)):
            with PasstUplink(topo.plan, published_ports=[f"{port}:8000"]) as up, \
                    _gateway(topo, up, policy) as gw:
                assert gw.published == {8000: port}
                r = subprocess.run(["curl", "-sS", "--max-time", "4",
                                    f"http://127.0.0.1:{port}/"],
                                   capture_output=True, text=True, timeout=20, check=False)
                if ok:
                    assert r.returncode == 0, r.stderr
                    assert r.stdout.startswith("hello from the guest"), r.stdout
                else:
                    assert r.returncode != 0, r.stdout
                    assert gw.stats()["not_reply"] >= 1  # the SYN, denied on ingress
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
