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

from netstack.addresses import GROUPS, classify_group, normalize_ip, parse_network
from netstack.destination import Destination
from netstack.errors import NetstackError, PolicyError
from netstack.flow import Decision, Flow
from netstack.names import normalize_domain
from netstack.policy import PRESET_ALIASES, NetworkPolicy, allow_dns_rule, canonical_preset
from netstack.rule import Rule, parse_port_range

__all__ = [
    "GROUPS",
    "PRESET_ALIASES",
    "Decision",
    "Destination",
    "Flow",
    "NetstackError",
    "NetworkPolicy",
    "PolicyError",
    "Rule",
    "allow_dns_rule",
    "canonical_preset",
    "classify_group",
    "normalize_domain",
    "normalize_ip",
    "parse_network",
    "parse_port_range",
]
