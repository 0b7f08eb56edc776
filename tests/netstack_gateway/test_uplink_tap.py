"""TapUplink: real namespaces, links and nftables; nothing leaks, even after SIGKILL."""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netstack.errors import UplinkError
from netstack.gateway import AddressPlan, TapUplink, cleanup_stale, uplink_names
from tests.netstack_gateway.kernel_objects import Snapshot, netns_links
from tests.netstack_gateway.kernel_objects import snapshot as host_snapshot
from tests.support import require_binaries, require_root

#: every uplink of this module is named "gw-test-*": its objects carry this token prefix
_MINE = "gwtest"


def snapshot() -> Snapshot:
    """This module's kernel objects only: objects that tests or sandboxes in other
    processes create meanwhile are neither counted nor deleted by the cleanup below."""
    s = host_snapshot()
    return Snapshot(*(frozenset(n for n in names if _MINE in n)
                      for names in (s.netns, s.links, s.nft_tables)))

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def baseline(home: Path) -> Iterator[Snapshot]:
    require_root()
    require_binaries("nft", "ip")
    before = snapshot()
    try:
        yield before
    finally:
        cleanup_stale(home)
        leftovers = {k: v - before.ours()[k] for k, v in snapshot().ours().items()}
        for name in leftovers["netns"]:
            subprocess.run(["ip", "netns", "del", name], check=False)
        for name in leftovers["links"]:
            subprocess.run(["ip", "link", "del", name], check=False)
        for name in leftovers["nft_tables"]:
            subprocess.run(["nft", "delete", "table", "inet", name], check=False)
        assert leftovers == {"netns": set(), "links": set(), "nft_tables": set()}


def assert_same(before: Snapshot) -> None:
    after = snapshot()
    assert after.ours() == before.ours()
    assert after.counts() == before.counts()


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def arp_request(plan: AddressPlan) -> bytes:
    sender = mac(plan.guest_mac)
    return (b"\xff" * 6 + sender + b"\x08\x06"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + sender + plan.guest_ipv4.packed
            + b"\0" * 6 + plan.gateway_ipv4.packed)


def read_frame(fd: int, want: bytes, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([fd], [], [], left)
        if r:
            data = os.read(fd, 65600)
            if want in data:
                return data
    raise AssertionError("no matching frame from the uplink TAP")


def test_create_and_close(home: Path, baseline: Snapshot) -> None:
    plan = AddressPlan(4001)
    up = TapUplink("gw-test-a", plan, vnet_hdr=False)   # bare frames on tap_fd
    n = uplink_names("gw-test-a")
    now = snapshot()
    assert now.counts() == {k: v + 1 for k, v in baseline.counts().items()}
    assert n["netns"] in now.netns and n["host_veth"] in now.links
    assert n["nft_table"] in now.nft_tables
    assert netns_links(n["netns"]) == {"lo", n["tap"], n["ns_veth"]}
    record = json.loads((home / "net" / "uplinks" / f"{n['token']}.json").read_text())
    assert record["pid"] == os.getpid() and record["netns"] == n["netns"]
    assert Path(f"/proc/sys/net/ipv4/conf/{n['host_veth']}/route_localnet").read_text() == "0\n"
    addrs = subprocess.run(["ip", "-n", n["netns"], "-br", "addr", "show", n["tap"]],
                           capture_output=True, text=True, check=True).stdout
    assert "172.16.62.133/30" in addrs and str(plan.gateway_ipv4) == "172.16.62.133"
    # the namespace's sysctls (set through netstack.gateway._netns, not `ip netns exec`)
    ns_sysctl = subprocess.run(["ip", "netns", "exec", n["netns"], "cat",
                                "/proc/sys/net/ipv4/ip_forward"],
                               capture_output=True, text=True, check=True).stdout
    assert ns_sysctl == "1\n"
    # the TAP carries frames: the namespace answers ARP for the gateway address
    os.write(up.tap_fd, arp_request(plan))
    reply = read_frame(up.tap_fd, plan.gateway_ipv4.packed + b"\0" * 0)
    assert reply[12:14] == b"\x08\x06" and reply[6:12] == mac(plan.gateway_mac)
    up.close()
    up.close()
    assert up.closed
    with pytest.raises(UplinkError, match="closed"):
        _ = up.tap_fd
    assert_same(baseline)
    assert not any((home / "net" / "uplinks").glob("*.json"))


def test_host_loopback_sets_route_localnet_on_own_veth_only(baseline: Snapshot) -> None:
    with TapUplink("gw-test-b", AddressPlan(4002), host_loopback=True) as up:
        hv = up.names["host_veth"]
        assert Path(f"/proc/sys/net/ipv4/conf/{hv}/route_localnet").read_text() == "1\n"
        ruleset = subprocess.run(["nft", "list", "table", "inet", up.names["nft_table"]],
                                 capture_output=True, text=True, check=True).stdout
        assert "dnat ip to 127.0.0.1" in ruleset
    assert_same(baseline)


def test_two_uplinks_and_duplicate_name(baseline: Snapshot) -> None:
    a = TapUplink("gw-test-c", AddressPlan(4003))
    try:
        with pytest.raises(UplinkError, match="already has an uplink owned by live pid"):
            TapUplink("gw-test-c", AddressPlan(4004))
        assert uplink_names("gw-test-c")["netns"] in snapshot().netns  # untouched
        with TapUplink("gw-test-d", AddressPlan(4004)):
            assert snapshot().counts()["netns"] == baseline.counts()["netns"] + 2
    finally:
        a.close()
    assert_same(baseline)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 64, "ünï", None])
def test_bad_sandbox_names(baseline: Snapshot, name: object) -> None:
    with pytest.raises(UplinkError, match="sandbox name"):
        TapUplink(name, AddressPlan(4005))  # type: ignore[arg-type]
    assert_same(baseline)


def test_bad_plan(baseline: Snapshot) -> None:
    with pytest.raises(UplinkError, match="AddressPlan"):
        TapUplink("gw-test-e", 3)  # type: ignore[arg-type]


_CHILD = """
import sys, time
from netstack.gateway import AddressPlan, TapUplink
up = TapUplink(sys.argv[1], AddressPlan(int(sys.argv[2])))
print("ready", flush=True)
if sys.argv[3] == "sleep":
    time.sleep(60)
"""


def run_child(home: Path, name: str, slot: int, mode: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", _CHILD, name, str(slot), mode],
                         stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "MICROVM_HOME": str(home)})
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def test_sigkilled_owner_is_cleaned_by_cleanup_stale(home: Path, baseline: Snapshot) -> None:
    live = run_child(home, "gw-test-live", 4007, "sleep")
    victim = run_child(home, "gw-test-kill", 4006, "sleep")
    try:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        n = uplink_names("gw-test-kill")
        left = snapshot()
        assert n["netns"] in left.netns and n["host_veth"] in left.links
        assert n["nft_table"] in left.nft_tables
        assert n["tap"] not in netns_links(n["netns"])  # the TAP died with its fd
        removed = cleanup_stale(home)
        assert sorted(removed) == sorted([f"nft table inet {n['nft_table']}",
                                          f"link {n['host_veth']}", f"netns {n['netns']}"])
        # the live owner's uplink is untouched
        after = snapshot()
        assert uplink_names("gw-test-live")["netns"] in after.netns
        assert after.counts() == {k: v + 1 for k, v in baseline.counts().items()}
        assert cleanup_stale(home) == []
    finally:
        for p in (live, victim):
            p.kill()
            p.wait(10)
            if p.stdout:
                p.stdout.close()
    cleanup_stale(home)
    assert_same(baseline)


def test_process_exit_without_close_cleans_up(home: Path, baseline: Snapshot) -> None:
    p = run_child(home, "gw-test-exit", 4008, "exit")
    assert p.wait(30) == 0
    if p.stdout:
        p.stdout.close()
    assert_same(baseline)
    assert not any((home / "net" / "uplinks").glob("*.json"))


def test_garbage_collected_uplink_is_removed(baseline: Snapshot) -> None:
    up = TapUplink("gw-test-gc", AddressPlan(4009))
    assert uplink_names("gw-test-gc")["netns"] in snapshot().netns
    del up
    assert_same(baseline)


def test_stale_record_for_same_name_is_replaced(home: Path, baseline: Snapshot) -> None:
    victim = run_child(home, "gw-test-again", 4010, "sleep")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    if victim.stdout:
        victim.stdout.close()
    with TapUplink("gw-test-again", AddressPlan(4010)) as up:
        assert not up.closed
        assert snapshot().counts() == {k: v + 1 for k, v in baseline.counts().items()}
    assert_same(baseline)


def test_unreadable_record_is_skipped(home: Path, baseline: Snapshot) -> None:
    d = home / "net" / "uplinks"
    d.mkdir(parents=True)
    (d / "junk.json").write_text("{not json")
    assert cleanup_stale(home) == []
    assert (d / "junk.json").exists()


def test_same_slot_twice_is_refused(baseline: Snapshot) -> None:
    with TapUplink("gw-test-f", AddressPlan(4011)):
        with pytest.raises(UplinkError, match="slot 4011 already has an uplink"):
            TapUplink("gw-test-g", AddressPlan(4011))
        assert uplink_names("gw-test-g")["netns"] not in snapshot().netns
    assert_same(baseline)


def test_unwritable_home(baseline: Snapshot, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UplinkError, match="cannot write the uplink record"):
        TapUplink("gw-test-h", AddressPlan(4012), home=blocker)
    assert_same(baseline)


def test_forked_child_exit_leaves_parents_uplink(baseline: Snapshot) -> None:
    with TapUplink("gw-test-fork", AddressPlan(4013), vnet_hdr=False) as up:
        pid = os.fork()
        if pid == 0:  # child: a normal interpreter exit runs atexit finalizers
            try:
                up.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert uplink_names("gw-test-fork")["netns"] in snapshot().netns
        os.write(up.tap_fd, arp_request(up.plan))
        read_frame(up.tap_fd, up.plan.gateway_ipv4.packed)
    assert_same(baseline)
