"""netstack: a userspace network filter for microVM sandboxes.

The policy model (this module's first layer) is pure Python:

>>> from netstack import NetworkPolicy, Rule, Flow
>>> policy = NetworkPolicy.custom(
...     rules=[Rule.allow(destination="api.example.com", protocol="tcp", port=443)],
...     deny_domain_suffixes=[".ads.example"])
>>> policy.evaluate(Flow("egress", "tcp", "10.0.0.1", 22)).reason
'no rule matched tcp egress to 10.0.0.1:22; default egress is deny'

Never imports ``rootfs``, ``tls_proxy`` or ``microvm``.
"""

from typing import TYPE_CHECKING

from netstack.addresses import GROUPS, classify_group, normalize_ip, parse_network
from netstack.classifier import (
    Classifier,
    ClassifierStats,
    CompiledEvaluator,
    FlowInfo,
    RuleCounter,
    StreamResult,
)
from netstack.destination import Destination
from netstack.dnsparse import DnsResponse, parse_dns_response
from netstack.errors import (
    FastPathError,
    MalformedDNS,
    MalformedFrame,
    MalformedHello,
    NetstackError,
    PolicyError,
)
from netstack.flow import Decision, Flow
from netstack.frameinfo import FrameInfo, parse_frame
from netstack.hello import ClientHelloInfo, parse_client_hello
from netstack.names import normalize_domain
from netstack.pincache import PinCache
from netstack.policy import PRESET_ALIASES, NetworkPolicy, allow_dns_rule, canonical_preset
from netstack.rule import Rule, parse_port_range
from netstack.verdict import Verdict

# The gateway (asyncio DNS forwarder, pyroute2, nftables plumbing) loads on first use:
# the policy model stays cheap to import. Type checkers see the real names.
if TYPE_CHECKING:
    from netstack.gateway import (
        AddressPlan,
        DnsForwarder,
        Gateway,
        PasstUplink,
        PcapWriter,
        SlotLease,
        TapUplink,
        Uplink,
        allocate_slot,
        cleanup_stale,
    )

_GATEWAY_NAMES = frozenset({"AddressPlan", "DnsForwarder", "Gateway", "PasstUplink",
                            "PcapWriter", "SlotLease", "TapUplink", "Uplink",
                            "allocate_slot", "cleanup_stale"})


def __getattr__(name: str) -> object:
    if name in _GATEWAY_NAMES:
        import netstack.gateway as _gateway

        value = getattr(_gateway, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'netstack' has no attribute {name!r}")

__all__ = [
    "GROUPS",
    "PRESET_ALIASES",
    "AddressPlan",
    "Classifier",
    "ClassifierStats",
    "ClientHelloInfo",
    "CompiledEvaluator",
    "Decision",
    "Destination",
    "DnsForwarder",
    "DnsResponse",
    "FastPathError",
    "Flow",
    "FlowInfo",
    "FrameInfo",
    "Gateway",
    "MalformedDNS",
    "MalformedFrame",
    "MalformedHello",
    "NetstackError",
    "NetworkPolicy",
    "PasstUplink",
    "PcapWriter",
    "PinCache",
    "PolicyError",
    "Rule",
    "RuleCounter",
    "SlotLease",
    "StreamResult",
    "TapUplink",
    "Uplink",
    "Verdict",
    "allocate_slot",
    "allow_dns_rule",
    "canonical_preset",
    "classify_group",
    "cleanup_stale",
    "normalize_domain",
    "normalize_ip",
    "parse_client_hello",
    "parse_dns_response",
    "parse_frame",
    "parse_network",
    "parse_port_range",
]
