"""netstack.gateway: the parts of a sandbox's network around the C frame loop.

* :class:`AddressPlan` / :func:`allocate_slot`: per-sandbox addresses, MACs, MTU and
  the guest's bootstrap network config.
* :class:`TapUplink`: netns + TAP + veth + nftables NAT (root); :func:`cleanup_stale`
  removes what a crashed process left behind.
* :class:`DnsForwarder`: the policy-enforcing asyncio DNS forwarder.
* :class:`Gateway`: the C frame loop + classifier + DNS forwarder of one sandbox.
* :class:`PcapWriter`: a thread-safe, size-bounded pcap/pcapng writer.

>>> from netstack.gateway import AddressPlan
>>> AddressPlan(0).guest_config()["ipv4"]["gateway"]
'172.16.0.1'
"""

from netstack.gateway.addressing import AddressPlan, SlotLease, allocate_slot, microvm_home
from netstack.gateway.dns_forwarder import (
    DnsForwarder,
    ForwarderThread,
    is_rebind_address,
    pin_cache_callback,
)
from netstack.gateway.gateway import Gateway
from netstack.gateway.pcap import PcapWriter
from netstack.gateway.published import PublishedPort
from netstack.gateway.state import cleanup_stale
from netstack.gateway.uplink_tap import TapUplink, uplink_names

__all__ = [
    "AddressPlan",
    "DnsForwarder",
    "ForwarderThread",
    "Gateway",
    "PcapWriter",
    "PublishedPort",
    "SlotLease",
    "TapUplink",
    "allocate_slot",
    "cleanup_stale",
    "is_rebind_address",
    "microvm_home",
    "pin_cache_callback",
    "uplink_names",
]
