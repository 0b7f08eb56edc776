"""Rule destinations: any, an IP network, a domain, a domain suffix, or a group."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Final, Literal

from netstack._addresses import (
    GROUP_ALIASES,
    AddressLike,
    IPNetwork,
    canonical_group,
    normalize_ip,
    parse_network,
)
from netstack._names import normalize_domain
from netstack.errors import PolicyError

DestinationKind = Literal["any", "cidr", "domain", "domain_suffix", "group"]

KINDS: Final[tuple[str, ...]] = ("any", "cidr", "domain", "domain_suffix", "group")

#: Accepted ``destination_kind`` spellings (the seed's and upstream SDKs').
KIND_ALIASES: Final[dict[str, str]] = {
    "any": "any",
    "ip": "ip",
    "cidr": "cidr",
    "domain": "domain",
    "domain_suffix": "domain_suffix",
    "domain-suffix": "domain_suffix",
    "suffix": "domain_suffix",
    "group": "group",
}


@dataclass(frozen=True, slots=True)
class Destination:
    """What a rule matches: the remote address on egress, the peer on ingress.

    Build with the constructors, never directly:

    >>> Destination.cidr("10.0.0.0/8")
    Destination.cidr('10.0.0.0/8')
    >>> Destination.ip("1.1.1.1").value
    '1.1.1.1/32'
    >>> Destination.domain_suffix(".Internal").value
    'internal'
    >>> Destination.parse("public")
    Destination.group('public')
    """

    kind: DestinationKind
    value: str | None = None

    # -- constructors -----------------------------------------------------------------
    @staticmethod
    def any() -> Destination:
        """Match every destination.

        >>> Destination.any().kind
        'any'
        """
        return Destination("any", None)

    @staticmethod
    def ip(value: AddressLike) -> Destination:
        """A single IP address, stored as a /32 or /128 network.

        >>> Destination.ip("2001:db8::1").value
        '2001:db8::1/128'
        """
        addr = normalize_ip(value)
        return Destination("cidr", f"{addr}/{addr.max_prefixlen}")

    @staticmethod
    def cidr(value: str | IPNetwork) -> Destination:
        """An IP network in CIDR notation; host bits must be zero.

        >>> Destination.cidr("192.168.0.0/16").value
        '192.168.0.0/16'
        """
        return Destination("cidr", str(parse_network(value)))

    @staticmethod
    def domain(value: str) -> Destination:
        """An exact host name (matched against DNS answers and the TLS SNI).

        >>> Destination.domain("API.example.com").value
        'api.example.com'
        """
        return Destination("domain", normalize_domain(value))

    @staticmethod
    def domain_suffix(value: str) -> Destination:
        """A domain and every name under it (label-aligned; ``.x``/``*.x`` accepted).

        >>> Destination.domain_suffix("*.example.com").value
        'example.com'
        """
        text = value.strip() if isinstance(value, str) else value
        if isinstance(text, str) and text.startswith("*."):
            text = text[2:]
            if not text.strip(". "):
                raise PolicyError(f"domain suffix {value!r} is empty (no name after '*.')")
        return Destination("domain_suffix", normalize_domain(text, what="domain suffix"))

    @staticmethod
    def group(name: str) -> Destination:
        """A predefined group: public, loopback, private, link_local, metadata, multicast, host.

        >>> Destination.group("link-local").value
        'link_local'
        """
        return Destination("group", canonical_group(name))

    @staticmethod
    def parse(text: str | None) -> Destination:
        """Classify a shorthand string the way the upstream SDKs do.

        In order: ``None``/``"*"``/``"any"`` -> any; ``domain=N``; ``suffix=N``; a
        group keyword; a leading ``.`` or ``*.`` -> suffix; contains ``/`` -> CIDR;
        parses as an IP -> /32 or /128; anything else -> an exact domain
        (so ``"localhost"`` is a domain, not the loopback group).

        >>> [Destination.parse(s).kind for s in ("*", "private", ".corp", "10.0.0.0/8", "1.1.1.1", "x.io")]
        ['any', 'group', 'domain_suffix', 'cidr', 'cidr', 'domain']
        """
        if text is None:
            return Destination.any()
        if not isinstance(text, str):
            raise PolicyError(f"destination must be a string or Destination, got {text!r}")
        s = text.strip()
        if not s:
            raise PolicyError("destination is an empty string (use None or '*' for any)")
        low = s.lower()
        if low in ("*", "any"):
            return Destination.any()
        if low.startswith("domain="):
            return Destination.domain(s[len("domain=") :])
        if low.startswith("suffix="):
            return Destination.domain_suffix(s[len("suffix=") :])
        if low in GROUP_ALIASES:
            return Destination.group(low)
        if s.startswith(".") or s.startswith("*."):
            return Destination.domain_suffix(s)
        if "/" in s and "://" not in s:
            return Destination.cidr(s)
        try:
            ipaddress.ip_address(s)
        except ValueError:
            return Destination.domain(s)
        return Destination.ip(s)

    @staticmethod
    def coerce(value: Destination | str | dict[str, Any] | None) -> Destination:
        """Accept a Destination, a shorthand string, ``None`` (any), or a wire dict.

        Wire dicts are upstream's serde shape (``"any"``, ``{"cidr": ...}``,
        ``{"group": ...}``, ...) or the seed's ``{"destination_kind": k, "destination": v}``.

        >>> Destination.coerce({"destination_kind": "ip", "destination": "10.1.2.3"}).value
        '10.1.2.3/32'
        """
        if isinstance(value, Destination):
            return value
        if value is None or isinstance(value, str):
            return Destination.parse(value)
        if isinstance(value, dict):
            return Destination.from_dict(value)
        raise PolicyError(
            f"invalid rule destination {value!r}: expected a Destination, a shorthand "
            "string, a dict, or None"
        )

    # -- wire format -----------------------------------------------------------------
    def to_dict(self) -> str | dict[str, str]:
        """Upstream's JSON shape: ``"any"`` or ``{kind: value}``.

        >>> Destination.group("host").to_dict()
        {'group': 'host'}
        """
        if self.kind == "any":
            return "any"
        assert self.value is not None
        return {self.kind: self.value}

    @staticmethod
    def from_dict(data: str | dict[str, Any]) -> Destination:
        """Inverse of :meth:`to_dict`; also reads the seed's ``destination_kind`` form.

        >>> Destination.from_dict({"domain_suffix": "example.com"}).value
        'example.com'
        """
        if data == "any":
            return Destination.any()
        if not isinstance(data, dict):
            raise PolicyError(f"invalid destination {data!r}: expected 'any' or a one-key dict")
        if "destination_kind" in data:
            extra = set(data) - {"destination_kind", "destination"}
            if extra:
                raise PolicyError(f"unknown destination keys {sorted(extra)} in {data!r}")
            kind = KIND_ALIASES.get(str(data["destination_kind"]).strip().lower())
            if kind is None:
                raise PolicyError(
                    f"unknown destination_kind {data['destination_kind']!r} "
                    "(expected any, ip, cidr, domain, domain_suffix or group)"
                )
            return _build(kind, data.get("destination"))
        if len(data) != 1:
            raise PolicyError(f"invalid destination {data!r}: expected exactly one key")
        ((key, val),) = data.items()
        kind = KIND_ALIASES.get(str(key).strip().lower())
        if kind is None:
            raise PolicyError(
                f"unknown destination kind {key!r} (expected any, ip, cidr, domain, "
                "domain_suffix or group)"
            )
        return _build(kind, val)

    # -- queries ---------------------------------------------------------------------
    @property
    def network(self) -> IPNetwork:
        """The IP network of a ``cidr`` destination.

        >>> Destination.cidr("10.0.0.0/8").network.num_addresses
        16777216
        """
        if self.kind != "cidr" or self.value is None:
            raise PolicyError(f"destination {self} is not a CIDR")
        return ipaddress.ip_network(self.value)

    def describe(self) -> str:
        """A short human form, e.g. ``"domain_suffix ads.example"`` or ``"any"``.

        >>> Destination.group("public").describe()
        'group public'
        """
        return "any" if self.kind == "any" else f"{self.kind} {self.value}"

    def __repr__(self) -> str:
        if self.kind == "any":
            return "Destination.any()"
        return f"Destination.{self.kind}({self.value!r})"


def _build(kind: str, value: Any) -> Destination:
    if kind == "any":
        if value not in (None, "", "*", "any"):
            raise PolicyError(f"destination kind 'any' takes no value, got {value!r}")
        return Destination.any()
    if value is None:
        raise PolicyError(f"destination kind {kind!r} needs a value")
    text = str(value)
    if kind == "ip":
        return Destination.ip(text)
    if kind == "cidr":
        return Destination.cidr(text)
    if kind == "domain":
        return Destination.domain(text)
    if kind == "domain_suffix":
        return Destination.domain_suffix(text)
    return Destination.group(text)
