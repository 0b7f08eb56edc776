"""netstack.gateway: the privileged parts of a sandbox's network around the C frame loop.

The "hazmat" layer under :mod:`netstack` (the policy model and the classifier): these
create network namespaces, TAPs, veths and nftables rules (root) or run passt, and
raise :class:`GatewayError` (and its subclasses, all exported here).

* :class:`AddressPlan` / :func:`allocate_slot`: per-sandbox addresses, MACs, MTU
  (default :data:`SANDBOX_GUEST_MTU`, 65520) and the guest's bootstrap network config.
* :class:`Uplink` / :class:`RedirectingUplink`: what a gateway needs from its uplink
  (a ``typing.Protocol``; bring your own).
* :class:`TapUplink`: netns + TAP + veth + nftables NAT (root), the root uplink;
  :func:`cleanup_stale` removes what a crashed process left behind.
* :class:`DnsForwarder`: the policy-enforcing asyncio DNS forwarder.
* :class:`Gateway`: the C frame loop + classifier + DNS forwarder of one sandbox.
* :class:`PcapWriter`: a thread-safe, size-bounded pcap/pcapng writer.
* :class:`TlsInterception`: the loopback listeners a gateway steers intercepted TLS to.

>>> from netstack.gateway import AddressPlan
>>> AddressPlan(0).guest_config()["ipv4"]["gateway"]
'172.16.0.1'
"""

from netstack.errors import (
    AddressPlanError,
    DnsForwarderError,
    GatewayError,
    PcapError,
    UplinkError,
)
from netstack.gateway._addressing import (
    SANDBOX_GUEST_MTU,
    AddressPlan,
    SlotLease,
    allocate_slot,
)
from netstack.gateway._dns_forwarder import DnsForwarder, pin_cache_callback
from netstack.gateway._gateway import Gateway
from netstack.gateway._pcap import PcapWriter
from netstack.gateway._published import PublishedPort
from netstack.gateway._state import cleanup_stale
from netstack.gateway._steering import TlsInterception
from netstack.gateway._uplink import (
    RedirectingUplink,
    Uplink,
    can_intercept_tls,
    has_redirects,
    missing_uplink_members,
)
from netstack.gateway._uplink_passt import PasstUplink, find_passt
from netstack.gateway._uplink_tap import TapUplink, uplink_names

__all__ = [
    "SANDBOX_GUEST_MTU",
    "AddressPlan",
    "AddressPlanError",
    "DnsForwarder",
    "DnsForwarderError",
    "Gateway",
    "GatewayError",
    "PasstUplink",
    "PcapError",
    "PcapWriter",
    "PublishedPort",
    "RedirectingUplink",
    "SlotLease",
    "TapUplink",
    "TlsInterception",
    "Uplink",
    "UplinkError",
    "allocate_slot",
    "can_intercept_tls",
    "cleanup_stale",
    "find_passt",
    "has_redirects",
    "missing_uplink_members",
    "pin_cache_callback",
    "uplink_names",
]
