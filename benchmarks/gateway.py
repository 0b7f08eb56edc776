"""Gateway path vs the kernel's direct path, in the same namespaces, in the same run.

Topology (tests/netstack_gateway/topology.py): guest netns -> fake VMM (u32-BE stream)
-> *gateway* -> TapUplink (netns + NAT) -> host -> upstream netns (198.51.100.10).
The *direct* path is a veth pair between the same two namespaces (10.214.0.1 ->
10.214.0.2): the kernel's own forwarding, our physical limit.

The gateway measured is the real one: :class:`netstack.gateway.Gateway` (the C gateway loop in
its own thread, classifying every frame with the compiled default policy
``public_only``; TEST-NET counts as public) on the VMM's stream socket. The VMM side is
a small C pump (``benchmarks/_netstack_gateway_pump.py``: guest TAP <-> u32-BE stream,
as a VMM's network backend does), not the tests' Python fake VMM, which would cap the
path near 1 Gbit/s by itself. By default the pump's guest TAP has TSO and the pump cuts
each TSO packet into MTU-sized frames itself (``GW_BENCH_GUEST_OFFLOAD=0``: one read()
per frame, the guest kernel segmenting); either way the gateway gets frames of at most
MTU + 14 bytes. Figures, all in the *default configuration*, what a sandbox gets
(``AddressPlan(slot)``: guest link MTU :data:`netstack.gateway.SANDBOX_GUEST_MTU` = 65520,
``TapUplink(name, plan)``: a ``vnet_hdr`` uplink at MTU 1500, ``Gateway`` defaults):
iperf3 TCP throughput (Mbit/s) (``tcp_throughput_ratio``; the guest TAP and the
gateway's plan get the default MTU, the uplink stays at 1500 and the direct veth at its
defaults), the same with the guest link at MTU 1500 (``tcp_throughput_mtu1500_ratio``),
iperf3 UDP small-packet (64-byte payload) receive rate,
TCP new-connection rate, the flow table's memory per flow (resident bytes of a
pre-faulted table divided by its capacity), and the share of one CPU the gateway thread
used during the TCP run (near 1.0 = the loop is the bottleneck; the user-mode part is
our code, the rest is mostly the kernel forwarding each frame written to the TAP); ``*_ratio`` = gateway / direct (> 1 would
mean the gateway path is faster than the kernel's).

Rootless section (when ``passt`` is installed; :func:`measure_rootless`): the same C
pump feeding passt's ``--fd`` directly (``passt_tcp_gbit_s``, ``passt_connects_per_s``)
vs the gateway with a 100-rule policy in front of a :class:`~netstack.gateway.PasstUplink`
(``rootless_tcp_gbit_s``, ``rootless_connects_per_s``); ``rootless_vs_passt_ratio``
(target >= 0.9) and ``rootless_connect_vs_passt_ratio`` = gateway+passt / passt alone.
The two paths alternate for :data:`ROOTLESS_ROUNDS` rounds (ABBA order, a fresh passt
each run) and each figure is the median; the single runs are in
``rootless_tcp_gbit_s_runs`` / ``passt_tcp_gbit_s_runs`` (on a shared 2-core box one run
of either path ranged 0.14-1.2 Gbit/s within a minute, which made one-shot ratios noise).

    python -m benchmarks.gateway [--quick]      # needs root, iperf3
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, NetNS

from benchmarks._common import quick_main
from benchmarks._netstack_gateway_pump import CPump
from netstack import Classifier, NetworkPolicy, Rule
from netstack.gateway import AddressPlan, Gateway, PasstUplink, TapUplink, cleanup_stale
from netstack.gateway._uplink_passt import STREAM_BUFFER, passt_argv
from tests.netstack_gateway.topology import UPSTREAM_IP, Topology

DIRECT_GUEST, DIRECT_UPSTREAM = "10.214.0.1", "10.214.0.2"
#: the uplink TAP's virtio-net header (the TapUplink default; GSO towards the uplink)
VNET = os.environ.get("GW_BENCH_VNET", "1") == "1"
#: the pump's guest TAP offers checksum/TSO offloads and the pump cuts TSO packets into
#: MTU-sized frames itself (as a VMM reading a virtio-net ring does without a syscall
#: per frame); 0 = one read() per guest frame, the kernel segmenting in the guest
GUEST_OFFLOAD = os.environ.get("GW_BENCH_GUEST_OFFLOAD", "1") == "1"
#: offered UDP load (64-byte payloads): ~98k datagrams/s (the same offered load on both
#: paths; unlimited -b 0 measures iperf3's sender more than the path)
UDP_RATE = "50M"
#: the guest link MTU measured besides the default (SANDBOX_GUEST_MTU)
SMALL_MTU = 1500
#: rounds of the rootless section (passt alone and gateway+passt alternate; medians)
ROOTLESS_ROUNDS = 4
#: the guest's TCP window in the rootless section (iperf3 -w): Debian 12's passt
#: (0.0~git20230309) loses guest segments once more is in flight than its host socket
#: takes, and the guest recovers only by retransmission timeouts (no SACK recovery, no
#: TAP drops, 10-20 RTOs per 8 s, intervals of 0 bit/s for seconds); uncapped, single
#: runs of either path ranged 0.06-7 Gbit/s. With 256 KiB in flight: no retransmissions.
#: The same passt reads its stream in large chunks and, when a chunk ends inside a frame,
#: blocks for the rest of it (and loses the framing if the cut falls inside a 4-byte
#: length), so the pump feeds it one frame per write, as QEMU does: with the pump's
#: 256 KiB writev() batches, cut by the kernel at arbitrary offsets, passt alone measured
#: ~2.6 Gbit/s, with one frame per write 6-7 Gbit/s.
ROOTLESS_WINDOW = "256K"

_CONNECT_RATE = r"""
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    s = socket.create_connection((host, port), timeout=5)
    s.close()
    n += 1
print(n / (time.perf_counter() - t0))
"""


_ACCEPTOR = r"""
import socket
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(1024)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.close()
"""


class Bench:
    """The topology, an uplink, the C gateway, a direct veth and an iperf3 server."""

    def __init__(self, topo: Topology, uplink: TapUplink, gateway: Gateway,
                 servers: list[subprocess.Popen[bytes]], pump: CPump) -> None:
        self.topo, self.uplink, self.gateway, self.servers = topo, uplink, gateway, servers
        self.pump = pump

    def in_guest(self, argv: list[str], timeout: float = 120) -> str:
        r = self.topo.run_in_guest(argv, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed in the guest namespace: {r.stderr[-500:]}")
        return r.stdout

    def tcp_mbps(self, host: str, seconds: int, window: str | None = None) -> float:
        extra = ["-w", window] if window else []
        out = json.loads(self.in_guest(["iperf3", "-c", host, "-t", str(seconds), "-J",
                                        *extra]))
        return float(out["end"]["sum_received"]["bits_per_second"]) / 1e6

    def warm_up(self) -> None:
        """One second of TCP on each path first (fresh namespaces, cold caches)."""
        self.tcp_mbps(UPSTREAM_IP, 1)
        self.tcp_mbps(DIRECT_UPSTREAM, 1)

    def udp_small_pps(self, host: str, seconds: int) -> float:
        out = json.loads(self.in_guest(["iperf3", "-c", host, "-u", "-b", UDP_RATE, "-l", "64",
                                        "-t", str(seconds), "-J"]))
        if "error" in out:
            raise RuntimeError(f"iperf3 UDP to {host}: {out['error']}")
        s = out["end"]["sum_received"]
        return int(s["bytes"]) / 64 / float(s["seconds"])  # datagrams that arrived, per s

    def connect_rate(self, host: str, seconds: float) -> float:
        return float(self.in_guest([sys.executable, "-c", _CONNECT_RATE, host, "8080",
                                    str(seconds)]))


@contextmanager
def bench_rig(mtu: int | None = None) -> Iterator[Bench]:
    """Build everything (root), tear everything down afterwards.

    ``mtu``: the guest link's MTU (the guest TAP and the gateway's plan; None: the
    :class:`~netstack.gateway.AddressPlan` default a sandbox gets); the uplink stays at 1500 and
    the direct veth at its defaults.
    """
    if os.geteuid() != 0:
        raise RuntimeError("the gateway benchmark needs root (namespaces, TAP, nftables)")
    # tmp holds the test CA's and servers' TLS private keys: it goes in `finally`, and
    # SIGTERM/SIGHUP unwind to that `finally` instead of killing the process on the spot.
    previous = _unwind_on_signals()
    owner = os.getpid()  # a forked helper (pyroute2) that finalizes this generator must not clean up
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    home = tmp / "home"
    plan = AddressPlan(3301) if mtu is None else AddressPlan(3301, mtu=mtu)
    uplink = topo = gateway = None
    pump: CPump | None = None
    servers: list[subprocess.Popen[bytes]] = []
    try:
        uplink = TapUplink("gw-bench", plan, home=home, vnet_hdr=VNET)
        topo = Topology(plan, tmp, token=f"b{os.getpid() % 0xFFFF:04x}",
                        guest_vnet_hdr=GUEST_OFFLOAD)
        assert topo.vmm_socket is not None
        vmm_sock, guest_tap = topo.detach_vmm()
        pump = CPump(vmm_sock.fileno(), guest_tap, vnet_hdr=GUEST_OFFLOAD, mtu=plan.mtu)
        gateway = Gateway(NetworkPolicy.public_only(), uplink=uplink,
                          guest_fd=topo.vmm_socket.fileno(), dns_upstreams=["198.51.100.53"],
                          log_denied=False)
        with IPRoute() as ipr:
            ipr.link("add", ifname=f"mvd{topo.token}", kind="veth",
                     peer={"ifname": "dir1", "net_ns_fd": topo.upstream_ns})
            idx = ipr.link_lookup(ifname=f"mvd{topo.token}")[0]
            ipr.link("set", index=idx, net_ns_fd=topo.guest_ns)
        for ns_name, ifname, ip in ((topo.guest_ns, f"mvd{topo.token}", DIRECT_GUEST),
                                    (topo.upstream_ns, "dir1", DIRECT_UPSTREAM)):
            with NetNS(ns_name, flags=0) as ns:
                idx = ns.link_lookup(ifname=ifname)[0]
                ns.addr("add", index=idx, address=f"{ip}/30")
                ns.link("set", index=idx, state="up")
        servers.append(subprocess.Popen(["ip", "netns", "exec", topo.upstream_ns, "iperf3",
                                         "-s"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        acceptor = subprocess.Popen(["ip", "netns", "exec", topo.upstream_ns, sys.executable,
                                     "-c", _ACCEPTOR], stdout=subprocess.PIPE)
        servers.append(acceptor)
        assert acceptor.stdout is not None and acceptor.stdout.readline() == b"ready\n"
        for _ in range(50):  # wait for the iperf3 server
            if subprocess.run(["ip", "netns", "exec", topo.upstream_ns, "ss", "-ltn",
                               "sport = :5201"], capture_output=True, text=True
                              ).stdout.count("LISTEN"):
                break
            subprocess.run(["sleep", "0.1"], check=True)
        yield Bench(topo, uplink, gateway, servers, pump)
    finally:
        # a forked helper (pyroute2's NetNS) inherits this frame: should it ever unwind,
        # it must not tear down the parent's rig
        if os.getpid() == owner:
            for proc in servers:
                proc.kill()
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
            if gateway is not None:
                gateway.close()
            if pump is not None:
                pump.stop()
            if topo is not None:
                topo.close()  # deleting the namespaces deletes the direct veth too
            if uplink is not None:
                uplink.close()
            cleanup_stale(home)
            shutil.rmtree(tmp, ignore_errors=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _unwind_on_signals() -> dict[int, Any]:
    """SIGTERM/SIGHUP raise SystemExit(128+N) in the main thread; returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            # a forked helper (pyroute2's NetNS is one) inherits this handler: unwinding
            # there would run the parent's cleanups (Topology deleting its namespaces)
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}


def _thread_cpu(name: str, user_only: bool = False) -> float:
    """CPU seconds (or user-mode seconds) used so far by this process's threads ``name``."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != name:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(fields[11]) + (0 if user_only else int(fields[12]))
        total += ticks / os.sysconf("SC_CLK_TCK")
    return total


def hundred_rule_policy() -> NetworkPolicy:
    """99 deny rules that do not match the upstream, then the allow that does (100 rules)."""
    rules = [Rule.deny(destination=f"10.{i // 250}.{i % 250}.0/24") for i in range(99)]
    return NetworkPolicy.custom(rules=[*rules, Rule.allow(destination="198.51.100.0/24")])


def _upstream_servers(topo: Topology) -> list[subprocess.Popen[bytes]]:
    servers = [subprocess.Popen(["ip", "netns", "exec", topo.upstream_ns, "iperf3", "-s"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    acceptor = subprocess.Popen(["ip", "netns", "exec", topo.upstream_ns, sys.executable,
                                 "-c", _ACCEPTOR], stdout=subprocess.PIPE)
    servers.append(acceptor)
    assert acceptor.stdout is not None and acceptor.stdout.readline() == b"ready\n"
    for _ in range(50):
        if subprocess.run(["ip", "netns", "exec", topo.upstream_ns, "ss", "-ltn",
                           "sport = :5201"], capture_output=True, text=True
                          ).stdout.count("LISTEN"):
            break
        subprocess.run(["sleep", "0.1"], check=True)
    return servers


def measure_rootless(seconds: int) -> dict[str, Any]:
    """The rootless path, same run, same VMM stand-in (the C pump): the VMM's stream
    straight into passt (``passt --fd``), then the gateway (100-rule policy) in front of
    a :class:`~netstack.gateway.PasstUplink` on the same stream. The namespaces are the test
    topology's (built as root); passt and the gateway need no privilege."""
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-rl-"))
    plan = AddressPlan(3302)
    topo = None
    pump: CPump | None = None
    servers: list[subprocess.Popen[bytes]] = []
    try:
        topo = Topology(plan, tmp, token=f"r{os.getpid() % 0xFFFF:04x}",
                        guest_vnet_hdr=GUEST_OFFLOAD)
        assert topo.vmm_socket is not None
        vmm_sock, guest_tap = topo.detach_vmm()
        # one frame per write, as QEMU's -netdev stream does (see ROOTLESS_WINDOW)
        pump = CPump(vmm_sock.fileno(), guest_tap, vnet_hdr=GUEST_OFFLOAD, mtu=plan.mtu,
                     frame_per_write=True)
        servers = _upstream_servers(topo)
        b = Bench(topo, None, None, servers, pump)  # type: ignore[arg-type]
        fd = topo.vmm_socket.fileno()
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # as the Gateway sizes them
            topo.vmm_socket.setsockopt(socket.SOL_SOCKET, opt, STREAM_BUFFER)
        def direct() -> tuple[float, float]:
            passt = subprocess.Popen(passt_argv(plan, fd), pass_fds=(fd,),
                                     start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            try:
                b.tcp_mbps(UPSTREAM_IP, 1)  # warm up (and the guest's ARP)
                return (b.tcp_mbps(UPSTREAM_IP, seconds, ROOTLESS_WINDOW),
                        b.connect_rate(UPSTREAM_IP, seconds / 2))
            finally:
                os.killpg(passt.pid, signal.SIGKILL)
                passt.wait(10)

        def gateway() -> tuple[float, float]:
            with PasstUplink(plan) as up, Gateway(hundred_rule_policy(), uplink=up,
                                                  guest_fd=fd,
                                                  dns_upstreams=["198.51.100.53"],
                                                  log_denied=False) as gw:
                b.tcp_mbps(UPSTREAM_IP, 1)
                got = (b.tcp_mbps(UPSTREAM_IP, seconds, ROOTLESS_WINDOW),
                       b.connect_rate(UPSTREAM_IP, seconds / 2))
                errors.append(gw.stats()["write_errors"])
                return got

        # the two paths alternate (ABBA...): on a shared box a single run of each was
        # dominated by whatever else ran at the time (runs of one path spread 0.14-1.2
        # Gbit/s within a minute), so each figure is the median of ROOTLESS_ROUNDS runs
        errors: list[int] = []
        runs: dict[str, list[tuple[float, float]]] = {"direct": [], "gateway": []}
        for i in range(ROOTLESS_ROUNDS):
            order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
            for path in order:
                runs[path].append(direct() if path == "direct" else gateway())
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        if pump is not None:
            pump.stop()
        if topo is not None:
            topo.close()
        shutil.rmtree(tmp, ignore_errors=True)
    passt_tcp = statistics.median(t for t, _ in runs["direct"])
    passt_conn = statistics.median(c for _, c in runs["direct"])
    rl_tcp = statistics.median(t for t, _ in runs["gateway"])
    rl_conn = statistics.median(c for _, c in runs["gateway"])
    return {
        "rootless_tcp_gbit_s": round(rl_tcp / 1000, 3),
        "passt_tcp_gbit_s": round(passt_tcp / 1000, 3),
        "rootless_vs_passt_ratio": round(rl_tcp / passt_tcp, 4),
        "rootless_connects_per_s": round(rl_conn, 1),
        "passt_connects_per_s": round(passt_conn, 1),
        "rootless_connect_vs_passt_ratio": round(rl_conn / passt_conn, 4),
        "rootless_policy_rules": len(hundred_rule_policy().rules),
        "rootless_write_errors": sum(errors),
        "rootless_rounds": ROOTLESS_ROUNDS,
        "rootless_tcp_window": ROOTLESS_WINDOW,
        "rootless_tcp_gbit_s_runs": [round(t / 1000, 3) for t, _ in runs["gateway"]],
        "passt_tcp_gbit_s_runs": [round(t / 1000, 3) for t, _ in runs["direct"]],
    }


def measure(quick: bool) -> dict[str, Any]:
    """Run every figure through the gateway path and the direct path."""
    seconds = 3 if quick else 10
    with bench_rig(SMALL_MTU) as b:  # TCP throughput over a 1500-byte guest link
        b.warm_up()
        small_gw_tcp = b.tcp_mbps(UPSTREAM_IP, seconds)
        small_direct_tcp = b.tcp_mbps(DIRECT_UPSTREAM, seconds)
    with bench_rig() as b:             # the default configuration: what a sandbox gets
        b.warm_up()
        cpu0, user0 = _thread_cpu("ns-gateway"), _thread_cpu("ns-gateway", True)
        gw_tcp = b.tcp_mbps(UPSTREAM_IP, seconds)
        loop_cpu = (_thread_cpu("ns-gateway") - cpu0) / seconds
        loop_user = (_thread_cpu("ns-gateway", True) - user0) / seconds
        direct_tcp = b.tcp_mbps(DIRECT_UPSTREAM, seconds)
        gw_pps = b.udp_small_pps(UPSTREAM_IP, seconds)
        direct_pps = b.udp_small_pps(DIRECT_UPSTREAM, seconds)
        gw_conn = b.connect_rate(UPSTREAM_IP, seconds / 2)
        direct_conn = b.connect_rate(DIRECT_UPSTREAM, seconds / 2)
        stats = b.gateway.stats()
        pump = b.pump.stats()
        guest_mtu = b.gateway.plan.mtu
    per_flow = flow_table_bytes_per_flow()
    rootless = measure_rootless(seconds) if shutil.which("passt") else {}
    return {
        **rootless,
        "gateway": "c-gateway (netstack.gateway.Gateway, policy public_only)",
        "seconds_per_run": seconds,
        "gateway_tcp_mbps": round(gw_tcp, 1),
        "direct_tcp_mbps": round(direct_tcp, 1),
        "tcp_throughput_ratio": round(gw_tcp / direct_tcp, 4),
        "guest_mtu": guest_mtu,
        "uplink_vnet_hdr": VNET,
        "gateway_tcp_mbps_mtu1500": round(small_gw_tcp, 1),
        "direct_tcp_mbps_mtu1500_run": round(small_direct_tcp, 1),
        "tcp_throughput_mtu1500_ratio": round(small_gw_tcp / small_direct_tcp, 4),
        "mss_raised": stats["mss_raised"],
        "too_big": stats["too_big"],
        "frag_needed": stats["frag_needed"],
        "gateway_udp64_pps": round(gw_pps),
        "direct_udp64_pps": round(direct_pps),
        "udp_small_packet_ratio": round(gw_pps / direct_pps, 4),
        "gateway_connects_per_s": round(gw_conn, 1),
        "direct_connects_per_s": round(direct_conn, 1),
        "connect_rate_ratio": round(gw_conn / direct_conn, 4),
        "flow_table_bytes_per_flow": per_flow,
        "gateway_loop_cpu_share_during_tcp": round(loop_cpu, 3),
        "gateway_loop_user_share_during_tcp": round(loop_user, 3),
        "gateway_frames": {k: stats[k] for k in ("guest_frames", "uplink_frames", "to_uplink",
                                                 "to_guest", "not_reply", "guest_overflow",
                                                 "write_errors", "events_dropped")},
        "gateway_flows_created": stats["flows"]["created"],
        "pump": {"guest_offload": GUEST_OFFLOAD, **pump},
    }


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def flow_table_bytes_per_flow(max_flows: int = 1 << 18) -> int:
    """Resident bytes a pre-faulted flow table of ``max_flows`` adds, per flow."""
    before = _rss()
    c = Classifier(NetworkPolicy.public_only(), max_flows=max_flows)
    grown = _rss() - before
    c.close()
    return round(grown / max_flows)


@pytest.fixture(scope="module")
def rig() -> Iterator[Bench]:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, TAP, nftables)")
    with bench_rig() as b:
        yield b


def test_gateway_tcp_throughput(benchmark: Any, rig: Bench) -> None:
    mbps = benchmark.pedantic(rig.tcp_mbps, args=(UPSTREAM_IP, 2), rounds=1, iterations=1)
    benchmark.extra_info["mbps"] = mbps


def test_direct_tcp_throughput(benchmark: Any, rig: Bench) -> None:
    mbps = benchmark.pedantic(rig.tcp_mbps, args=(DIRECT_UPSTREAM, 2), rounds=1, iterations=1)
    benchmark.extra_info["mbps"] = mbps


def main() -> None:
    quick_main(__doc__, measure, "3 s per run (under a minute)")


if __name__ == "__main__":
    main()
