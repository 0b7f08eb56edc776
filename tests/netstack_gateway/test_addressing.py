"""AddressPlan values, guest_config, validation, and slot leases across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netstack.errors import AddressPlanError, NetstackError
from netstack.gateway import AddressPlan, allocate_slot

pytestmark = pytest.mark.timeout(60)


def test_slot_zero_plan_matches_reference() -> None:
    p = AddressPlan(0)
    assert p.guest_config() == {
        "interface": "eth0", "mac": "02:6d:73:00:00:02", "mtu": 65520,  # SANDBOX_GUEST_MTU (upstream: 1500)
        "ipv4": {"address": "172.16.0.2", "prefix_len": 30, "gateway": "172.16.0.1",
                 "dns": ["172.16.0.1"]},
        "hosts": {"host.microvm.internal": "172.16.0.1"},
    }
    assert p.gateway_mac == "02:6d:73:00:00:01"
    assert str(p.network_ipv4) == "172.16.0.0/30"


@pytest.mark.parametrize(("slot", "guest", "gw", "mac", "net6"), [
    (1, "172.16.0.6", "172.16.0.5", "02:6d:73:00:01:02", "fd42:6d73:62:1::/64"),
    (64, "172.16.1.2", "172.16.1.1", "02:6d:73:00:40:02", "fd42:6d73:62:40::/64"),
    (0x1234, "172.16.72.210", "172.16.72.209", "02:6d:73:12:34:02", "fd42:6d73:62:1234::/64"),
    (65535, "172.19.255.254", "172.19.255.253", "02:6d:73:ff:ff:02", "fd42:6d73:62:ffff::/64"),
])
def test_plan_per_slot(slot: int, guest: str, gw: str, mac: str, net6: str) -> None:
    p = AddressPlan(slot, ipv6=True)
    assert (str(p.guest_ipv4), str(p.gateway_ipv4), p.guest_mac) == (guest, gw, mac)
    assert str(p.network_ipv6) == net6
    assert str(p.guest_ipv6) == net6.replace("/64", "2") and str(p.gateway_ipv6).endswith("::1")
    cfg = p.guest_config()
    assert cfg["ipv6"] == {"address": str(p.guest_ipv6), "prefix_len": 64,
                           "gateway": str(p.gateway_ipv6), "dns": [str(p.gateway_ipv6)]}
    assert p.gateway_addresses == (gw, str(p.gateway_ipv6))
    assert p.network_ipv4.subnet_of(__import__("ipaddress").ip_network("172.16.0.0/12"))


def test_plans_never_overlap() -> None:
    nets = [AddressPlan(s).network_ipv4 for s in (0, 1, 2, 1000, 65534, 65535)]
    assert len({n.network_address for n in nets}) == len(nets)
    assert all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:])


def test_custom_mtu_alias_interface() -> None:
    cfg = AddressPlan(3, mtu=9000, host_alias="Gw.Sandbox.Test", interface="net0").guest_config()
    assert cfg["mtu"] == 9000 and cfg["interface"] == "net0"
    assert cfg["hosts"] == {"gw.sandbox.test": "172.16.0.13"}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"slot": -1}, "out of range"), ({"slot": 65536}, "out of range"),
    ({"slot": True}, "must be an int"), ({"slot": "1"}, "must be an int"),
    ({"slot": 0, "mtu": 100}, "mtu"), ({"slot": 0, "mtu": 70000}, "mtu"),
    ({"slot": 0, "host_alias": ""}, "host_alias"), ({"slot": 0, "host_alias": "a..b"}, "host_alias"),
    ({"slot": 0, "interface": "x" * 16}, "interface"),
])
def test_invalid_plans(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(AddressPlanError, match=match) as e:
        AddressPlan(**kwargs)  # type: ignore[arg-type]
    assert isinstance(e.value, NetstackError) and isinstance(e.value, ValueError)


def test_leases_in_one_process(home: Path) -> None:
    a, b = allocate_slot(), allocate_slot()
    assert (a.slot, b.slot) == (0, 1)
    assert (home / "net" / "slots" / "0.lock").exists()
    a.release()
    with allocate_slot() as c:
        assert c.slot == 0 and c.plan(ipv6=True).slot == 0
    with pytest.raises(AddressPlanError, match="slot 1 is already leased"):
        allocate_slot(1)
    b.release()
    assert allocate_slot(1).slot == 1  # garbage-collected lease released
    with pytest.raises(AddressPlanError, match="out of range"):
        allocate_slot(70000)


_HOLDER = """
import sys, time
from netstack.gateway import allocate_slot
lease = allocate_slot()
print(lease.slot, flush=True)
time.sleep(60)
"""


def test_concurrent_processes_get_distinct_slots(home: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "MICROVM_HOME": str(home)})
             for _ in range(6)]
    try:
        slots = [int(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        assert sorted(slots) == list(range(6))
        # a SIGKILLed holder's slot comes back (the kernel drops its flock) ...
        victim = procs[slots.index(2)]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        deadline = time.monotonic() + 10
        while True:
            try:
                lease = allocate_slot(2)
                break
            except AddressPlanError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        # ... and the live holders keep theirs
        assert allocate_slot().slot == 6
        lease.release()
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
            if p.stdout:
                p.stdout.close()


# -- properties ------------------------------------------------------------------------
slots = st.integers(min_value=0, max_value=65535)


@given(slots)
def test_plan_invariants(slot: int) -> None:
    import ipaddress

    p = AddressPlan(slot, ipv6=True)
    assert p.network_ipv4.prefixlen == 30
    assert p.network_ipv4.subnet_of(ipaddress.IPv4Network("172.16.0.0/12"))
    assert int(p.guest_ipv4) - int(ipaddress.IPv4Address("172.16.0.0")) == 4 * slot + 2
    assert p.gateway_ipv4 + 1 == p.guest_ipv4 and p.guest_ipv4 in p.network_ipv4
    assert p.network_ipv6 is not None and p.guest_ipv6 in p.network_ipv6
    assert p.network_ipv6.subnet_of(ipaddress.IPv6Network("fd42:6d73:62::/48"))
    assert int(p.guest_mac.replace(":", "")[6:10], 16) == slot
    assert p.guest_mac[:-2] == p.gateway_mac[:-2]
    assert int(p.guest_mac.split(":")[0], 16) & 0b11 == 0b10  # locally administered unicast


@given(slots, slots)
def test_distinct_slots_never_collide(a: int, b: int) -> None:
    pa, pb = AddressPlan(a, ipv6=True), AddressPlan(b, ipv6=True)
    if a != b:
        assert not pa.network_ipv4.overlaps(pb.network_ipv4)
        assert pa.guest_mac != pb.guest_mac and pa.guest_ipv6 != pb.guest_ipv6
