"""End to end: multi-MB transfers through a 1500 and a large-MTU (65520) guest link.

The guest namespace's TAP gets the plan's MTU (as a VMM would configure virtio-net's
MTU); the uplink stays at 1500. Uploads make the guest emit frames of up to 65,534
bytes, which the C loop writes to the vnet-header uplink as GSO packets cut to the
uplink's MSS; downloads come back as 1500-byte frames. Both transports (stream and
datagram) carry the large frames.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from netstack import NetworkPolicy
from netstack.errors import GatewayError
from netstack.gateway import AddressPlan, Gateway, TapUplink, cleanup_stale
from tests.netstack_gateway.topology import UPSTREAM_DNS_IP, UPSTREAM_IP, uplink_and_topology
from tests.support import require_binaries, require_root

pytestmark = pytest.mark.timeout(60)
SIZE = 6_000_000


@pytest.mark.parametrize(("mtu", "mode", "slot"), [(1500, "stream", 3207),
                                                   (65520, "stream", 3208),
                                                   (65520, "dgram", 3209)])
def test_multi_mb_transfers_through_the_guest_link(tmp_path: Path, mtu: int, mode: str,
                                                   slot: int) -> None:
    require_root()
    require_binaries("ip", "nft", "curl")
    with uplink_and_topology(f"gw-mtu-{slot}", AddressPlan(slot, mtu=mtu), tmp_path,
                             f"{slot % 10}m", mode=mode, vnet_hdr=True) as (uplink, topo):
        assert uplink.mtu == 1500
        assert topo.vmm_socket is not None
        data = os.urandom(SIZE)
        upload = tmp_path / "upload.bin"
        upload.write_bytes(data)
        with Gateway(NetworkPolicy.public_only(), uplink=uplink,
                     guest_fd=topo.vmm_socket.fileno(), transport=mode,  # type: ignore[arg-type]
                     dns_upstreams=[UPSTREAM_DNS_IP]) as gw:
            assert gw.guest_config()["mtu"] == mtu
            link = topo.run_in_guest(["ip", "-o", "link", "show", "eth0"]).stdout
            assert f"mtu {mtu} " in link
            r = topo.run_in_guest(["curl", "-sS", "--max-time", "40", "-T", str(upload),
                                   f"http://{UPSTREAM_IP}/up"], timeout=50)
            assert r.returncode == 0, r.stderr
            assert r.stdout == f"got {SIZE} {hashlib.sha256(data).hexdigest()}\n"
            r = topo.run_in_guest(["curl", "-sS", "--max-time", "40", "-o", "/dev/null", "-w",
                                   "%{size_download}", f"http://{UPSTREAM_IP}/big?n={SIZE}"],
                                  timeout=50)
            assert r.returncode == 0 and r.stdout == str(SIZE), r.stderr
            st = gw.stats()
            assert st["too_big"] == 0 and st["write_errors"] == 0
            if mtu > 1500:
                assert st["mss_raised"] >= 2  # the SYN-ACKs of both connections
                assert st["guest_bytes"] / st["guest_frames"] > 3000  # large frames went out
            else:
                assert st["mss_raised"] == 0


def test_large_mtu_needs_a_vnet_uplink_and_bad_mtus_are_typed_errors(tmp_path: Path) -> None:
    require_root()
    home = tmp_path / "home"
    with TapUplink("gw-mtu-plain", AddressPlan(3210), home=home, vnet_hdr=False) as up:
        assert up.mtu == 1500 and up.plan.mtu == 65520
        for bad in (70000, 100, "9000", True):
            with pytest.raises(GatewayError, match="mtu"):
                Gateway(NetworkPolicy.none(), uplink=up, guest_fd=0, mtu=bad)  # type: ignore[arg-type]
        for big in (9000, None):   # None: the plan's default 65520
            with pytest.raises(GatewayError, match="vnet_hdr"):
                Gateway(NetworkPolicy.none(), uplink=up, guest_fd=0, mtu=big)
        # a guest link below 1500 lowers the uplink TAP's MTU with it
        a, b = socket.socketpair()
        with Gateway(NetworkPolicy.none(), uplink=up, guest_socket=a, mtu=1280,
                     dns_upstreams=["192.0.2.53"]) as gw:
            assert up.mtu == 1280 and gw.guest_config()["mtu"] == 1280
        b.close()
    cleanup_stale(home)
