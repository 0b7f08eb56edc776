"""Policy rules: an action, a direction, a destination, and protocol/port filters."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from netstack._destination import Destination
from netstack.errors import PolicyError

Action = Literal["allow", "deny"]
Direction = Literal["egress", "ingress", "any"]
Protocol = Literal["tcp", "udp", "icmpv4", "icmpv6"]
PortRange = tuple[int, int]

ACTIONS: Final[tuple[str, ...]] = ("allow", "deny")
DIRECTIONS: Final[tuple[str, ...]] = ("egress", "ingress", "any")
PROTOCOLS: Final[tuple[str, ...]] = ("tcp", "udp", "icmpv4", "icmpv6")

PortSpec = int | str | tuple[int, int]


def _choice(value: object, allowed: tuple[str, ...], error: str) -> str:
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in allowed:
        raise PolicyError(error.format(value=value))
    return key


def parse_action(value: object) -> Action:
    """``"allow"`` or ``"deny"`` (case-insensitive).

    >>> parse_action("DENY")
    'deny'
    """
    return cast(Action, _choice(value, ACTIONS, "action must be 'allow' or 'deny', got {value!r}"))


def parse_direction(value: object) -> Direction:
    """``"egress"``, ``"ingress"`` or ``"any"`` (case-insensitive).

    >>> parse_direction("Ingress")
    'ingress'
    """
    return cast(Direction, _choice(value, DIRECTIONS,
                                   "direction must be one of egress, ingress, any; got {value!r}"))


def parse_protocol(value: object) -> Protocol:
    """One of ``tcp``, ``udp``, ``icmpv4``, ``icmpv6`` (case-insensitive).

    >>> parse_protocol("TCP")
    'tcp'
    """
    return cast(Protocol, _choice(
        value, PROTOCOLS, "unknown protocol {value!r} (expected one of tcp, udp, icmpv4, icmpv6)"))


def _port_number(value: object, spec: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"invalid port {spec!r}: expected an integer 1-65535 or 'lo-hi'")
    if not 1 <= value <= 65535:
        raise PolicyError(f"port {value} in {spec!r} is out of range (1-65535)")
    return value


def parse_port_range(spec: PortSpec) -> PortRange:
    """Parse ``443``, ``"443"``, ``"8000-9000"`` or ``(8000, 9000)`` into an inclusive range.

    >>> parse_port_range("8000-9000"), parse_port_range(53)
    ((8000, 9000), (53, 53))

    A malformed, out-of-range or inverted range raises :class:`~netstack.PolicyError`;
    nothing is ever turned into "any port".
    """
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise PolicyError(f"invalid port range {spec!r}: expected (start, end)")
        lo, hi = (_port_number(v, spec) for v in spec)
    elif isinstance(spec, str):
        text = spec.strip()
        parts = text.split("-")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise PolicyError(f"invalid port or port range {spec!r} (expected N or lo-hi)")
        nums = [int(p) for p in parts]
        lo = _port_number(nums[0], spec)
        hi = _port_number(nums[-1], spec)
    else:
        lo = hi = _port_number(spec, spec)
    if lo > hi:
        raise PolicyError(f"port range {spec!r} is inverted (start {lo} > end {hi})")
    return (lo, hi)


def _listify(one: Any, many: Any, *, ports: bool = False) -> list[Any]:
    """Flatten ``protocol``+``protocols`` (or ``port``+``ports``) into one list.

    A string or int is one item; for ports, a 2-tuple of ints is one range.
    """
    out: list[Any] = []
    for v in (many, one):
        if v is None:
            continue
        is_range = (ports and isinstance(v, tuple) and len(v) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
        if isinstance(v, str | int) or is_range:
            out.append(v)
        elif isinstance(v, Iterable) and not isinstance(v, bytes | dict):
            out.extend(v)
        else:
            out.append(v)
    return out


def _one_of(name: str, one: object, many: object) -> None:
    """Refuse ``port`` together with ``ports`` (or ``protocol`` with ``protocols``)."""
    if one is not None and many is not None:
        raise PolicyError(f"give {name} or {name}s, not both (got {name}={one!r}, "
                          f"{name}s={many!r}); list every value in {name}s")


ICMP_PROTOCOLS: Final[frozenset[str]] = frozenset({"icmpv4", "icmpv6"})


def _check_icmp(action: str, direction: str, protocols: frozenset[str],
                ports: tuple[PortRange, ...]) -> None:
    """Refuse ICMP rules that could never match (they would silently do nothing)."""
    icmp = sorted(ICMP_PROTOCOLS & protocols)
    if not icmp:
        return
    named = ",".join(icmp)
    if ports:
        rng = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
        raise PolicyError(
            f"{action} rule for {named} with ports {rng} can never match: ICMP has no ports "
            "(give ICMP its own rule without ports)")
    if direction != "egress":
        raise PolicyError(
            f"{action} rule for {named} with direction {direction!r} can never match inbound "
            "ICMP: the gateway relays no inbound ICMP, so ICMP rules are egress-only "
            "(use direction='egress')")


def _merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    # Keep the caller's ranges (sorted, duplicates dropped); merging is only a
    # representation change, so it never widens the set of ports.
    out: list[PortRange] = []
    for lo, hi in sorted(set(ranges)):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Rule:
    """One first-match rule. Build with :meth:`allow` / :meth:`deny`.

    >>> r = Rule.allow(destination="1.1.1.1", protocol="tcp", port="443")
    >>> r.destination, r.protocols, r.ports
    (Destination.cidr('1.1.1.1/32'), frozenset({'tcp'}), ((443, 443),))
    >>> Rule.deny(destination=Destination.group("metadata")).describe()
    'deny egress group metadata'

    ``protocols`` empty means any protocol; ``ports`` empty means any port. Ports are
    always the guest-side port (destination port on egress, listening port on ingress).
    A rule that names ``icmpv4``/``icmpv6`` must be an egress rule without ports (ICMP
    has no ports and the gateway relays no inbound ICMP); anything else could never
    match and raises :class:`~netstack.PolicyError`.

    >>> Rule.allow(protocol="icmpv4", port=80)
    Traceback (most recent call last):
    ...
    netstack.errors.PolicyError: allow rule for icmpv4 with ports 80 can never match: ICMP has no ports (give ICMP its own rule without ports)
    """

    action: Action
    direction: Direction = "egress"
    destination: Destination = Destination("any")  # noqa: RUF009 (frozen, immutable)
    protocols: frozenset[Protocol] = frozenset()
    ports: tuple[PortRange, ...] = ()

    def __post_init__(self) -> None:
        parse_action(self.action)
        parse_direction(self.direction)
        if not isinstance(self.destination, Destination):
            raise PolicyError(f"rule destination must be a Destination, got {self.destination!r}")
        if not isinstance(self.protocols, frozenset):
            raise PolicyError(f"rule protocols must be a frozenset, got {self.protocols!r}")
        protos = frozenset(parse_protocol(p) for p in self.protocols)
        if not isinstance(self.ports, tuple):
            raise PolicyError(f"rule ports must be a tuple of (start, end), got {self.ports!r}")
        for r in self.ports:
            parse_port_range(r)
        _check_icmp(self.action, parse_direction(self.direction), protos, self.ports)

    @classmethod
    def build(
        cls,
        action: str,
        *,
        destination: Destination | str | dict[str, Any] | None = None,
        direction: str = "egress",
        protocol: str | Iterable[str] | None = None,
        protocols: str | Iterable[str] | None = None,
        port: PortSpec | Iterable[PortSpec] | None = None,
        ports: PortSpec | Iterable[PortSpec] | None = None,
    ) -> Rule:
        """Validate and build a rule (``allow``/``deny`` are the usual entry points).

        Give ``port`` or ``ports`` (and ``protocol`` or ``protocols``), not both.

        >>> Rule.build("deny", destination=".ads.example").destination.kind
        'domain_suffix'
        """
        _one_of("port", port, ports)
        _one_of("protocol", protocol, protocols)
        protos = frozenset(parse_protocol(p) for p in _listify(protocol, protocols))
        port_ranges = _merge_ranges(parse_port_range(p) for p in _listify(port, ports, ports=True))
        return cls(
            action=parse_action(action),
            direction=parse_direction(direction),
            destination=Destination.coerce(destination),
            protocols=protos,
            ports=port_ranges,
        )

    @classmethod
    def allow(
        cls,
        destination: Destination | str | dict[str, Any] | None = None,
        *,
        direction: str = "egress",
        protocol: str | Iterable[str] | None = None,
        protocols: str | Iterable[str] | None = None,
        port: PortSpec | Iterable[PortSpec] | None = None,
        ports: PortSpec | Iterable[PortSpec] | None = None,
    ) -> Rule:
        """An allow rule.

        >>> Rule.allow(destination="api.example.com", protocol="tcp", port=443).describe()
        'allow egress domain api.example.com tcp port 443'
        """
        return cls.build(
            "allow", destination=destination, direction=direction, protocol=protocol,
            protocols=protocols, port=port, ports=ports,
        )

    @classmethod
    def deny(
        cls,
        destination: Destination | str | dict[str, Any] | None = None,
        *,
        direction: str = "egress",
        protocol: str | Iterable[str] | None = None,
        protocols: str | Iterable[str] | None = None,
        port: PortSpec | Iterable[PortSpec] | None = None,
        ports: PortSpec | Iterable[PortSpec] | None = None,
    ) -> Rule:
        """A deny rule.

        >>> Rule.deny(destination="10.0.0.0/8", direction="any").describe()
        'deny any cidr 10.0.0.0/8'
        """
        return cls.build(
            "deny", destination=destination, direction=direction, protocol=protocol,
            protocols=protocols, port=port, ports=ports,
        )

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse upstream's CLI rule token ``<action>[:<direction>]@<target>[:<proto>[:<ports>]]``.

        ``target``: ``any``/``*``, ``dns`` (the gateway's resolver: udp+tcp port 53), a
        group (``public private loopback link-local meta(data) multicast host``), an IPv4
        address or CIDR, ``[IPv6]`` or ``[IPv6/len]`` (brackets only around IPv6), a
        domain with a dot, ``domain=NAME``, ``suffix=NAME``, ``*.NAME`` or ``.NAME``;
        ``proto``: ``any tcp udp icmpv4 icmpv6``; ``ports``: ``any``, ``N`` or ``lo-hi``.
        Refused with :class:`~netstack.PolicyError`: ICMP with ports, ICMP not egress, a
        bare word without a dot (with a suggestion), a suffix that is a bare TLD,
        ``example.com:443`` (write ``example.com:tcp:443``), ``dns`` with a port other
        than 53, unbracketed IPv6, brackets around anything else.

        >>> Rule.parse("allow@api.example.com:tcp:443").describe()
        'allow egress domain api.example.com tcp port 443'
        >>> Rule.parse("deny:any@10.0.0.0/8").describe()
        'deny any cidr 10.0.0.0/8'
        >>> Rule.parse("allow@dns").describe()
        'allow egress group host tcp,udp port 53'
        >>> Rule.parse("allow@example.com:443")
        Traceback (most recent call last):
        ...
        netstack.errors.PolicyError: rule 'allow@example.com:443': '443' is not a protocol; write the protocol before the port, e.g. 'allow@example.com:tcp:443'
        """
        return _parse_rule_token(cls, text)

    # -- matching helpers ------------------------------------------------------------
    def applies_to(self, direction: str) -> bool:
        """Whether this rule is consulted for traffic in ``direction``.

        >>> Rule.allow(direction="any").applies_to("ingress")
        True
        """
        return self.direction == "any" or self.direction == direction

    def matches_transport(self, protocol: str, port: int | None) -> bool:
        """Protocol and port filters (a port filter never matches a port-less flow).

        >>> Rule.allow(protocol="udp", port=53).matches_transport("udp", 53)
        True
        >>> Rule.allow(port=53).matches_transport("icmpv4", None)
        False
        """
        if self.protocols and protocol not in self.protocols:
            return False
        if self.ports:
            if port is None:
                return False
            return any(lo <= port <= hi for lo, hi in self.ports)
        return True

    # -- presentation / wire ---------------------------------------------------------
    def describe(self) -> str:
        """Human form: ``"allow egress group host udp,tcp port 53"``.

        >>> Rule.allow(destination="host", protocols=["udp", "tcp"], port=53).describe()
        'allow egress group host tcp,udp port 53'
        """
        parts = [self.action, self.direction, self.destination.describe()]
        if self.protocols:
            parts.append(",".join(p for p in PROTOCOLS if p in self.protocols))
        if self.ports:
            rng = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
            parts.append(("port " if len(self.ports) == 1 and "-" not in rng else "ports ") + rng)
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Upstream's JSON shape for a rule.

        >>> Rule.deny(destination="10.0.0.0/8", port="1-1024").to_dict()["ports"]
        [{'start': 1, 'end': 1024}]
        """
        return {
            "direction": self.direction,
            "destination": self.destination.to_dict(),
            "protocols": [p for p in PROTOCOLS if p in self.protocols],
            "ports": [{"start": lo, "end": hi} for lo, hi in self.ports],
            "action": self.action,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        """Read a rule from upstream's JSON shape or the seed's hash shape.

        Accepts ``protocol``/``protocols``, ``port``/``ports`` (ints, ``"lo-hi"``
        strings or ``{"start", "end"}`` dicts), ``destination`` as a wire dict or a
        shorthand string, or ``destination_kind`` + ``destination``. Unknown keys are
        an error (a typo must never silently widen a rule).

        >>> Rule.from_dict({"action": "allow", "destination": "1.1.1.1", "port": "443"}).ports
        ((443, 443),)
        """
        if isinstance(data, Rule):
            return data
        if not isinstance(data, dict):
            raise PolicyError(f"rule must be a dict or Rule, got {data!r}")
        allowed = {"action", "direction", "destination", "destination_kind", "protocol",
                   "protocols", "port", "ports"}
        keys = {str(k) for k in data}
        unknown = keys - allowed
        if unknown:
            raise PolicyError(f"unknown rule keys {sorted(unknown)} in {data!r}")
        d = {str(k): v for k, v in data.items()}
        if "action" not in d:
            raise PolicyError(f"rule {data!r} has no action (allow or deny)")
        if "destination_kind" in d:
            dest: Destination = Destination.from_dict(
                {"destination_kind": d["destination_kind"], "destination": d.get("destination")}
            )
        else:
            dest = Destination.coerce(d.get("destination"))

        def ports_of(v: Any) -> Any:
            if isinstance(v, dict):
                return (v.get("start"), v.get("end"))
            if isinstance(v, list):
                return [ports_of(x) for x in v]
            return v

        return cls.build(
            str(d["action"]),
            destination=dest,
            direction=d.get("direction", "egress"),
            protocol=d.get("protocol"),
            protocols=d.get("protocols"),
            port=ports_of(d.get("port")),
            ports=ports_of(d.get("ports")),
        )


_GROUP_WORDS: Final[dict[str, str]] = {
    "public": "public", "private": "private", "loopback": "loopback", "host": "host",
    "link-local": "link_local", "link_local": "link_local", "meta": "metadata",
    "metadata": "metadata", "multicast": "multicast",
}
_TARGET_WORDS: Final[tuple[str, ...]] = ("any", "dns", *_GROUP_WORDS)


def _suffix(text: str, token: str) -> Destination:
    name = text.strip(".")
    if name and "." not in name:
        raise PolicyError(f"rule {token!r}: suffix {text!r} is a bare top-level domain (would "
                          f"match every name under it); name a registrable domain like "
                          f"'example.{name}'")
    return Destination.domain_suffix(text)


def _target(text: str, token: str) -> tuple[Destination, bool]:
    """The destination of a rule token, and whether it was ``dns``."""
    low = text.lower()
    if not text:
        raise PolicyError(f"rule {token!r}: no target after '@' (any, dns, a group, an IP, "
                          f"a CIDR, a domain, suffix=NAME)")
    if low in ("any", "*"):
        return Destination.any(), False
    if low == "dns":
        return Destination.group("host"), True
    if low in _GROUP_WORDS:
        return Destination.group(_GROUP_WORDS[low]), False
    if low.startswith("domain="):
        return Destination.domain(text[7:]), False
    if low.startswith("suffix="):
        return _suffix(text[7:], token), False
    if text.startswith("*.") or text.startswith("."):
        return _suffix(text[2:] if text.startswith("*.") else text[1:], token), False
    if "/" in text:
        net = text.split("/", 1)[0]
        if ":" in net:
            raise PolicyError(f"rule {token!r}: put an IPv6 CIDR in brackets, e.g. '[{text}]'")
        return Destination.cidr(text), False
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if addr is not None:
        return Destination.ip(text), False
    if "." not in text:
        import difflib

        near = difflib.get_close_matches(low, _TARGET_WORDS, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise PolicyError(f"rule {token!r}: unknown target {text!r}: {hint}targets are any, "
                          f"dns, a group ({', '.join(g for g in _GROUP_WORDS if g != 'link_local')}"
                          f"), an IP, a CIDR, a domain with a dot, domain=NAME or suffix=NAME")
    return Destination.domain(text), False


def _parse_rule_token(cls: type[Rule], text: str) -> Rule:
    if not isinstance(text, str):
        raise PolicyError(f"rule must be a string like 'allow@example.com:tcp:443', got {text!r}")
    token = text.strip()
    head, at, tail = token.partition("@")
    if not at:
        raise PolicyError(f"rule {text!r} has no '@': write <action>[:<direction>]@<target>"
                          f"[:<proto>[:<ports>]], e.g. 'allow@example.com:tcp:443'")
    action, _, direction = head.partition(":")
    try:
        act = parse_action(action)
        dirn = parse_direction(direction or "egress")
    except PolicyError as e:
        raise PolicyError(f"rule {text!r}: {e}") from None
    if tail.startswith("["):
        end = tail.find("]")
        if end < 0:
            raise PolicyError(f"rule {text!r}: '[' without a closing ']'")
        inner, rest = tail[1:end], tail[end + 1:]
        if ":" not in inner.split("/", 1)[0]:
            raise PolicyError(f"rule {text!r}: brackets go only around IPv6 addresses, not "
                              f"{inner!r} (write it without brackets)")
        if rest and not rest.startswith(":"):
            raise PolicyError(f"rule {text!r}: expected ':' after ']', got {rest[:1]!r}")
        fields = rest[1:].split(":") if rest else []
        try:
            dest = (Destination.cidr(inner) if "/" in inner else Destination.ip(inner))
        except PolicyError as e:
            raise PolicyError(f"rule {text!r}: {e}") from None
        is_dns = False
    else:
        target, *fields = tail.split(":")
        if len(fields) > 2:
            raise PolicyError(f"rule {text!r}: too many ':' after the target (an IPv6 address "
                              f"goes in brackets, e.g. 'allow@[2001:db8::1]:tcp:443')")
        try:
            dest, is_dns = _target(target, text)
        except PolicyError as e:
            msg = str(e)
            raise PolicyError(msg if msg.startswith("rule ") else f"rule {text!r}: {msg}") from None
    if len(fields) > 2:
        raise PolicyError(f"rule {text!r}: too many fields after the target "
                          f"(<target>[:<proto>[:<ports>]])")
    proto = fields[0].lower() if fields else "any"
    ports = fields[1].lower() if len(fields) > 1 else "any"
    if proto and proto[0].isdigit():
        raise PolicyError(f"rule {text!r}: {fields[0]!r} is not a protocol; write the protocol "
                          f"before the port, e.g. '{act}@{tail.split(':')[0]}:tcp:{fields[0]}'")
    protos: list[str] = [] if proto == "any" else [proto]
    if is_dns:
        if ports not in ("any", "53"):
            raise PolicyError(f"rule {text!r}: the dns target is port 53 only, got port "
                              f"{fields[1]!r}")
        if protos and protos[0] not in ("tcp", "udp"):
            raise PolicyError(f"rule {text!r}: the dns target is udp or tcp, got {proto!r}")
        return cls.build(act, destination=dest, direction=dirn,
                         protocols=protos or ["udp", "tcp"], ports=[53])
    try:
        return cls.build(act, destination=dest, direction=dirn, protocols=protos,
                         ports=[] if ports == "any" else [ports])
    except PolicyError as e:
        raise PolicyError(f"rule {text!r}: {e}") from None
