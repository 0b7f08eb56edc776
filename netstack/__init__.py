"""netstack: a userspace network filter for microVM sandboxes.

This package is the safe layer (the "recipes"): the policy model (pure Python) and the
classifier that enforces it on frames (the C fast path: frame, DNS and ClientHello
parsers, DNS pins, verdicts), with every error netstack raises. The privileged
network parts (uplinks, the gateway loop, the DNS forwarder, pcap, address plans)
are :mod:`netstack.gateway` ("hazmat": root or passt, namespaces, TAPs, nftables).

>>> from netstack import NetworkPolicy, Rule, Flow
>>> policy = NetworkPolicy.custom(
...     rules=[Rule.allow(destination="api.example.com", protocol="tcp", port=443)],
...     deny_domain_suffixes=[".ads.example"])
>>> policy.evaluate(Flow("egress", "tcp", "10.0.0.1", 22)).reason
'no rule matched tcp egress to 10.0.0.1:22; default egress is deny'

Never imports ``rootfs``, ``tls_proxy`` or ``microvm``.
"""

from netstack._addresses import GROUPS, classify_group, normalize_ip, parse_network
from netstack._classifier import (
    Classifier,
    ClassifierStats,
    CompiledEvaluator,
    FlowInfo,
    RuleCounter,
    StreamResult,
)
from netstack._destination import Destination
from netstack._dnsparse import DnsResponse, parse_dns_response
from netstack._flow import Decision, Flow
from netstack._frameinfo import FrameInfo, build_frame, parse_frame
from netstack._hello import ClientHelloInfo, parse_client_hello
from netstack._names import normalize_domain
from netstack._pincache import PinCache
from netstack._policy import PRESET_ALIASES, NetworkPolicy, allow_dns_rule, canonical_preset
from netstack._rule import Rule, parse_port_range
from netstack._verdict import Verdict
from netstack.errors import (
    AddressPlanError,
    DnsForwarderError,
    FastPathError,
    GatewayError,
    MalformedDNS,
    MalformedFrame,
    MalformedHello,
    NetstackError,
    PcapError,
    PolicyError,
    UplinkError,
)

__all__ = [
    "GROUPS",
    "PRESET_ALIASES",
    "AddressPlanError",
    "Classifier",
    "ClassifierStats",
    "ClientHelloInfo",
    "CompiledEvaluator",
    "Decision",
    "Destination",
    "DnsForwarderError",
    "DnsResponse",
    "FastPathError",
    "Flow",
    "FlowInfo",
    "FrameInfo",
    "GatewayError",
    "MalformedDNS",
    "MalformedFrame",
    "MalformedHello",
    "NetstackError",
    "NetworkPolicy",
    "PcapError",
    "PinCache",
    "PolicyError",
    "Rule",
    "RuleCounter",
    "StreamResult",
    "UplinkError",
    "Verdict",
    "allow_dns_rule",
    "build_frame",
    "canonical_preset",
    "classify_group",
    "normalize_domain",
    "normalize_ip",
    "parse_client_hello",
    "parse_dns_response",
    "parse_frame",
    "parse_network",
    "parse_port_range",
]
