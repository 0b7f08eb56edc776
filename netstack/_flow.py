"""What the evaluator decides about: a :class:`Flow`, and its :class:`Decision`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from netstack._addresses import AddressLike, IPAddress, normalize_gateway, normalize_ip
from netstack._names import normalize_domain, try_normalize_domain
from netstack._rule import Action, parse_protocol
from netstack.errors import PolicyError

FlowDirection = Literal["egress", "ingress"]


@dataclass(frozen=True, slots=True, init=False)
class Flow:
    """One connection, datagram or ICMP exchange, seen from the sandbox.

    ``remote`` is the destination IP on egress and the peer IP on ingress; ``port``
    is the guest-side port (``None`` for ICMP); ``sni`` the TLS server name of the
    first flight, if any; ``names`` the hostnames the DNS pin cache holds for
    ``remote``; ``gateway`` the sandbox's gateway addresses (the ``host`` group).

    >>> f = Flow("egress", "tcp", "203.0.113.7", 443, sni="API.example.com.")
    >>> f.remote, f.sni
    (IPv4Address('203.0.113.7'), 'api.example.com')
    """

    direction: FlowDirection
    protocol: str
    remote: IPAddress
    port: int | None
    sni: str | None
    names: frozenset[str]
    gateway: tuple[IPAddress, ...]

    def __init__(
        self,
        direction: str,
        protocol: str,
        remote: AddressLike,
        port: int | None = None,
        sni: str | None = None,
        names: Iterable[str] = frozenset(),
        gateway: Iterable[AddressLike] | AddressLike = (),
    ) -> None:
        if direction not in ("egress", "ingress"):
            raise PolicyError(f"flow direction must be 'egress' or 'ingress', got {direction!r}")
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
        ):
            raise PolicyError(f"flow port must be an integer 0-65535 or None, got {port!r}")
        if isinstance(names, str):
            raise PolicyError(f"flow names must be a collection of names, got the string {names!r}")
        canon_names = frozenset(n for n in (try_normalize_domain(x) for x in names) if n)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "protocol", parse_protocol(protocol))
        object.__setattr__(self, "remote", normalize_ip(remote))
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "sni", None if sni is None else normalize_domain(sni, what="SNI"))
        object.__setattr__(self, "names", canon_names)
        object.__setattr__(self, "gateway", normalize_gateway(gateway))

    def describe(self) -> str:
        """``"tcp egress to 203.0.113.7:443"`` / ``"icmpv4 ingress from 192.0.2.1"``.

        >>> Flow("ingress", "udp", "192.0.2.1", 53).describe()
        'udp ingress from 192.0.2.1 to guest port 53'
        """
        if self.direction == "egress":
            where = f"to {_hostport(self.remote, self.port)}"
        else:
            where = f"from {self.remote}" + ("" if self.port is None else
                                                f" to guest port {self.port}")
        return f"{self.protocol} {self.direction} {where}"


def _hostport(ip: IPAddress, port: int | None) -> str:
    if port is None:
        return str(ip)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The evaluator's answer: the action, which rule decided, and why.

    ``rule_index`` is ``None`` when the direction's default applied. ``notes`` hold
    hints about near misses (rules that almost matched) for :meth:`NetworkPolicy.explain`.

    >>> Decision("deny", None, "no rule matched; default egress is deny").allowed
    False
    """

    action: Action
    rule_index: int | None
    reason: str
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def allowed(self) -> bool:
        """True when the action is ``allow``.

        >>> Decision("allow", 0, "rule 0").allowed
        True
        """
        return self.action == "allow"
