"""The network policy model and its pure-Python reference evaluator.

A :class:`NetworkPolicy` is an ordered list of :class:`~netstack.Rule` plus a default
action per direction. Evaluation is first-match-wins per direction; the C fast path
(``netstack.Classifier``) agrees with :meth:`NetworkPolicy.evaluate` bit for bit.

Wire format (``to_dict``/``from_dict``, JSON-serialisable; upstream microsandbox's
serde shape)::

    {"default_egress": "deny", "default_ingress": "allow",
     "rules": [{"direction": "egress", "destination": {"group": "host"},
                "protocols": ["tcp", "udp"], "ports": [{"start": 53, "end": 53}],
                "action": "allow"}, ...]}

``destination`` is ``"any"`` or one of ``{"cidr": "10.0.0.0/8"}``,
``{"domain": "api.example.com"}``, ``{"domain_suffix": "example.com"}``,
``{"group": "public"}``. Empty ``protocols``/``ports`` mean any. Missing defaults
read as ``deny`` (fail closed), as upstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from netstack._addresses import AddressLike, IPAddress, classify_group, normalize_gateway
from netstack._destination import Destination
from netstack._flow import Decision, Flow
from netstack._names import suffix_matches, try_normalize_domain
from netstack._rule import Action, Rule, parse_action, parse_protocol
from netstack.errors import PolicyError

#: Canonical preset name for every accepted alias (the seed's table).
PRESET_ALIASES: Final[dict[str, str]] = {
    "none": "none", "disabled": "none", "disable": "none", "airgapped": "none",
    "public": "public_only", "public_only": "public_only", "public-only": "public_only",
    "default": "public_only",
    "all": "allow_all", "allow_all": "allow_all", "allow-all": "allow_all",
    "non_local": "non_local", "non-local": "non_local", "nonlocal": "non_local",
}

#: Profiles for :meth:`NetworkPolicy.from_profiles`, in canonical rule order.
PROFILES: Final[tuple[str, ...]] = ("public", "private", "host")


def allow_dns_rule() -> Rule:
    """``allow egress group host udp,tcp port 53``: DNS to the gateway's forwarder.

    >>> allow_dns_rule().describe()
    'allow egress group host tcp,udp port 53'
    """
    return Rule.allow(Destination.group("host"), protocols=("udp", "tcp"), port=53)


def canonical_preset(name: object) -> str:
    """Map a preset alias to its canonical name.

    >>> canonical_preset("Airgapped"), canonical_preset("public-only")
    ('none', 'public_only')
    """
    key = str(name).strip().lower() if isinstance(name, str) else None
    if key is None or key not in PRESET_ALIASES:
        raise PolicyError(
            f"unknown network preset {name!r} (expected one of public_only, none, allow_all, "
            f"non_local, or an alias: {', '.join(sorted(PRESET_ALIASES))})"
        )
    return PRESET_ALIASES[key]


def _deny_rules(deny_domains: Iterable[str] | None, deny_suffixes: Iterable[str] | None
                ) -> tuple[Rule, ...]:
    out: list[Rule] = []
    for items, ctor in ((deny_domains, Destination.domain),
                        (deny_suffixes, Destination.domain_suffix)):
        if items is None:
            continue
        if isinstance(items, str):
            raise PolicyError(f"deny lists take a list of names, got the string {items!r}")
        out.extend(Rule.deny(ctor(d)) for d in items)
    return tuple(out)


def _parse_rules(rules: object, what: str = "rules") -> tuple[Rule, ...]:
    """Each element a :class:`Rule` or a rule dict; an error names the element and its index."""
    if isinstance(rules, Rule | Mapping):
        raise PolicyError(f"{what} must be a list of rules, not a single rule: {rules!r}")
    if isinstance(rules, str | bytes) or not isinstance(rules, Iterable):
        raise PolicyError(f"{what} must be a list of rules (Rule objects or dicts), got {rules!r}")
    out: list[Rule] = []
    for i, item in enumerate(rules):
        if isinstance(item, Rule):
            out.append(item)
            continue
        if not isinstance(item, Mapping):
            raise PolicyError(f"{what}[{i}] must be a Rule or a rule dict, got "
                              f"{type(item).__name__} {item!r}")
        try:
            out.append(Rule.from_dict(dict(item)))
        except PolicyError as e:
            raise PolicyError(f"{what}[{i}]: {e}") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """A sandbox network policy: ordered rules plus a default per direction.

    >>> p = NetworkPolicy.custom(
    ...     rules=[Rule.allow(destination="api.example.com", protocol="tcp", port=443)],
    ...     deny_domain_suffixes=[".ads.example"])
    >>> [r.describe() for r in p.rules]
    ['deny egress domain_suffix ads.example', 'allow egress domain api.example.com tcp port 443']
    >>> NetworkPolicy.public_only().evaluate(Flow("egress", "tcp", "10.0.0.1", 22)).action
    'deny'
    """

    default_egress: Action = "deny"
    default_ingress: Action = "allow"
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        parse_action(self.default_egress)
        parse_action(self.default_ingress)
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise PolicyError("NetworkPolicy.rules must be a tuple of Rule objects")

    # -- presets ---------------------------------------------------------------------
    @classmethod
    def public_only(cls) -> NetworkPolicy:
        """The default: DNS to the gateway, then public internet only.

        >>> [r.describe() for r in NetworkPolicy.public_only().rules]
        ['allow egress group host tcp,udp port 53', 'allow egress group public']
        """
        return cls("deny", "allow", (allow_dns_rule(), Rule.allow(Destination.group("public"))))

    @classmethod
    def non_local(cls) -> NetworkPolicy:
        """Public internet plus private/LAN ranges (not the host).

        >>> len(NetworkPolicy.non_local().rules)
        3
        """
        return cls("deny", "allow", (allow_dns_rule(), Rule.allow(Destination.group("public")),
                                     Rule.allow(Destination.group("private"))))

    @classmethod
    def none(cls) -> NetworkPolicy:
        """No network at all, DNS included.

        >>> NetworkPolicy.none().rules
        ()
        """
        return cls("deny", "deny", ())

    @classmethod
    def allow_all(cls) -> NetworkPolicy:
        """Everything allowed, both directions (the metadata address included).

        >>> NetworkPolicy.allow_all().default_egress
        'allow'
        """
        return cls("allow", "allow", ())

    @classmethod
    def preset(cls, name: str) -> NetworkPolicy:
        """A preset by name or alias (see :data:`PRESET_ALIASES`).

        >>> NetworkPolicy.preset("airgapped") == NetworkPolicy.none()
        True
        """
        canon = canonical_preset(name)
        factory = {"none": cls.none, "public_only": cls.public_only,
                   "allow_all": cls.allow_all, "non_local": cls.non_local}[canon]
        return factory()

    @classmethod
    def default(cls) -> NetworkPolicy:
        """The default policy, ``public_only``.

        >>> NetworkPolicy.default() == NetworkPolicy.public_only()
        True
        """
        return cls.public_only()

    @classmethod
    def from_profiles(cls, *profiles: str) -> NetworkPolicy:
        """Compose ``public``, ``private`` and ``host`` profiles.

        Rules come in canonical order (public, private, host) whatever the input
        order, after the DNS rule; no profile at all gives no rules (and no DNS).

        >>> [r.describe() for r in NetworkPolicy.from_profiles("host", "public").rules]
        ['allow egress group host tcp,udp port 53', 'allow egress group public', 'allow egress group host']
        """
        names: set[str] = set()
        for p in profiles:
            key = p.strip().lower() if isinstance(p, str) else None
            if key not in PROFILES:
                hint = " (use NetworkPolicy.preset for 'all'/'none')" if key in ("all", "none") \
                    else ""
                raise PolicyError(
                    f"unknown network profile {p!r} (expected public, private or host){hint}"
                )
            names.add(key)
        if not names:
            return cls("deny", "allow", ())
        rules = [allow_dns_rule()]
        rules.extend(Rule.allow(Destination.group(g)) for g in PROFILES if g in names)
        return cls("deny", "allow", tuple(rules))

    @classmethod
    def custom(
        cls,
        default_egress: str = "deny",
        default_ingress: str = "allow",
        rules: Iterable[Rule | Mapping[str, Any]] = (),
        deny_domains: Iterable[str] = (),
        deny_domain_suffixes: Iterable[str] = (),
    ) -> NetworkPolicy:
        """A custom policy; deny lists are prepended so they outrank later allows.

        ``rules`` holds :class:`~netstack.Rule` objects or rule dicts; anything else
        raises :class:`~netstack.PolicyError` naming the element and its index.

        >>> NetworkPolicy.custom(default_egress="allow", deny_domains=["x.test"]).rules[0].describe()
        'deny egress domain x.test'
        >>> NetworkPolicy.custom(rules=[Rule.allow("public"), 5])
        Traceback (most recent call last):
        ...
        netstack.errors.PolicyError: rules[1] must be a Rule or a rule dict, got int 5
        """
        parsed = _parse_rules(rules)
        return cls(parse_action(default_egress), parse_action(default_ingress),
                   _deny_rules(deny_domains, deny_domain_suffixes) + parsed)

    def with_denied_domains(self, deny_domains: Iterable[str] = (),
                            deny_domain_suffixes: Iterable[str] = ()) -> NetworkPolicy:
        """This policy with deny-domain rules prepended.

        >>> NetworkPolicy.public_only().with_denied_domains(["a.test"]).rules[0].describe()
        'deny egress domain a.test'
        """
        return NetworkPolicy(self.default_egress, self.default_ingress,
                             _deny_rules(deny_domains, deny_domain_suffixes) + self.rules)

    @classmethod
    def coerce(cls, value: NetworkPolicy | str | Mapping[str, Any] | None) -> NetworkPolicy:
        """Accept what a user may pass as ``network=``.

        * a :class:`NetworkPolicy` (returned as is), ``None`` (the default);
        * a preset name or alias;
        * a dict, with the seed's semantics: ``{"preset": p, "deny_domains": [...],
          "deny_domain_suffixes": [...]}``; a custom policy
          (``default_egress``/``default_ingress``/``rules`` + deny lists, defaults
          deny/allow); a deny-list-only dict (everything allowed but those domains);
          ``{}`` (the default). ``preset`` with rules or defaults is an error.
          A dict in the wire format of :meth:`to_dict` is read too.

        >>> NetworkPolicy.coerce({"deny_domains": ["x.test"]}).default_egress
        'allow'
        >>> NetworkPolicy.coerce("public") == NetworkPolicy.public_only()
        True
        """
        if value is None:
            return cls.default()
        if isinstance(value, NetworkPolicy):
            return value
        if isinstance(value, str):
            return cls.preset(value)
        if not isinstance(value, Mapping):
            raise PolicyError(
                "network policy must be a preset name, a NetworkPolicy, or a dict "
                f"(got {type(value).__name__})"
            )
        d = {str(k): v for k, v in value.items()}
        known = {"preset", "default_egress", "default_ingress", "rules", "deny_domains",
                 "deny_domain_suffixes"}
        unknown = set(d) - known
        if unknown:
            raise PolicyError(f"unknown network policy keys {sorted(unknown)} "
                              f"(expected {', '.join(sorted(known))})")
        deny_d, deny_s = d.get("deny_domains") or (), d.get("deny_domain_suffixes") or ()
        if "preset" in d:
            clash = [k for k in ("rules", "default_egress", "default_ingress") if k in d]
            if clash:
                raise PolicyError(
                    f"network preset cannot be combined with {', '.join(clash)} (the preset "
                    "already defines its rules and defaults); only deny_domains and "
                    "deny_domain_suffixes may be layered on a preset"
                )
            return cls.preset(d["preset"]).with_denied_domains(deny_d, deny_s)
        if any(k in d for k in ("rules", "default_egress", "default_ingress")):
            return cls.custom(
                default_egress=d.get("default_egress", "deny"),
                default_ingress=d.get("default_ingress", "allow"),
                rules=d.get("rules") or (),
                deny_domains=deny_d,
                deny_domain_suffixes=deny_s,
            )
        if not deny_d and not deny_s:
            return cls.default()
        return cls("allow", "allow", _deny_rules(deny_d, deny_s))

    # -- wire format -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable wire form (see the module docstring).

        >>> NetworkPolicy.none().to_dict()
        {'default_egress': 'deny', 'default_ingress': 'deny', 'rules': []}
        """
        return {"default_egress": self.default_egress, "default_ingress": self.default_ingress,
                "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkPolicy:
        """Inverse of :meth:`to_dict`. Missing defaults read as ``deny`` (fail closed).

        >>> p = NetworkPolicy.public_only()
        >>> NetworkPolicy.from_dict(p.to_dict()) == p
        True
        """
        if not isinstance(data, Mapping):
            raise PolicyError(f"policy wire form must be a dict, got {type(data).__name__}")
        unknown = set(map(str, data)) - {"default_egress", "default_ingress", "rules"}
        if unknown:
            raise PolicyError(f"unknown policy keys {sorted(unknown)} "
                              "(expected default_egress, default_ingress, rules)")
        rules = data.get("rules") or []
        if not isinstance(rules, list | tuple):
            raise PolicyError(f"policy rules must be a list, got {type(rules).__name__}")
        return cls(parse_action(data.get("default_egress", "deny")),
                   parse_action(data.get("default_ingress", "deny")),
                   _parse_rules(rules))

    # -- queries ---------------------------------------------------------------------
    @property
    def has_domain_rules(self) -> bool:
        """Whether any rule names a domain or suffix (SNI/pin-cache matching needed).

        >>> NetworkPolicy.public_only().has_domain_rules
        False
        """
        return any(r.destination.kind in ("domain", "domain_suffix") for r in self.rules)

    def evaluate(self, flow: Flow) -> Decision:
        """Decide a flow: first matching rule of its direction, else the default.

        Domain rules: with an SNI, an *allow* rule needs the SNI to match AND the pin
        cache to map ``remote`` to a matching name; a *deny* rule needs only the SNI
        to match. Without an SNI, both match when a pinned name of ``remote`` does.
        An address with no known name never matches a domain rule.

        >>> p = NetworkPolicy.custom(rules=[Rule.allow("example.com")])
        >>> p.evaluate(Flow("egress", "tcp", "203.0.113.9", 443, sni="example.com",
        ...                 names={"example.com"})).reason
        'rule 0: allow egress domain example.com matched SNI example.com (pinned to 203.0.113.9)'
        """
        return self._evaluate(flow, want_notes=False)

    def explain(self, flow: Flow) -> str:
        """Why a flow is allowed or denied: the decision's reason, then hints.

        The first line is exactly ``evaluate(flow).reason``; following lines (if any)
        name rules that nearly matched and what they lacked, e.g. a domain allow rule
        whose name matched the SNI while the address was never resolved through the
        sandbox's DNS.

        >>> p = NetworkPolicy.custom(rules=[Rule.allow("example.com", protocol="tcp")])
        >>> print(p.explain(Flow("egress", "tcp", "203.0.113.9", 443, sni="example.com")))
        no rule matched tcp egress to 203.0.113.9:443 (SNI example.com); default egress is deny
        note: rule 0 (allow egress domain example.com tcp) matched SNI example.com but 203.0.113.9 is not pinned to that name: resolve it through the sandbox's DNS first
        """
        d = self._evaluate(flow, want_notes=True)
        return "\n".join((d.reason, *d.notes))

    def evaluate_dns(self, qname: str, protocol: str = "udp", port: int = 53) -> Decision:
        """Decide a DNS query for ``qname`` arriving over ``protocol``/``port``.

        Egress and any-direction rules in order: a domain rule matches iff the name
        equals it and a suffix rule iff label-aligned (their protocol/port filters are
        ignored); an ``any`` rule or a ``group host`` rule matches if its protocol/port
        filter admits the DNS transport; other CIDR/group rules never match. Names that
        are not valid domains only match ``any``. Deny means NXDOMAIN.

        >>> p = NetworkPolicy.custom(rules=[Rule.allow("example.com")])
        >>> p.evaluate_dns("example.com").action, p.evaluate_dns("leak.example.com").action
        ('allow', 'deny')
        """
        proto = parse_protocol(protocol)
        name = try_normalize_domain(qname) if isinstance(qname, str) else None
        shown = name if name is not None else repr(qname)
        for i, rule in enumerate(self.rules):
            if not rule.applies_to("egress"):
                continue
            dest = rule.destination
            if dest.kind == "domain":
                hit = name is not None and name == dest.value
            elif dest.kind == "domain_suffix":
                hit = name is not None and dest.value is not None \
                    and suffix_matches(dest.value, name)
            elif dest.kind == "any" or (dest.kind == "group" and dest.value == "host"):
                hit = rule.matches_transport(proto, port)
            else:
                hit = False
            if hit:
                return Decision(rule.action, i, f"rule {i}: {rule.describe()} matched DNS query "
                                                f"{shown} ({proto}/{port})")
        return Decision(self.default_egress, None,
                        f"no rule matched DNS query {shown} ({proto}/{port}); default egress is "
                        f"{self.default_egress}")

    def rebind_exempt(self, answer: AddressLike, gateway: Iterable[AddressLike] = ()) -> bool:
        """Whether a private/reserved DNS answer may pass rebind protection.

        True only if the first *address-only* egress rule matching ``answer`` (a CIDR
        or group rule with no port filter whose protocols are empty or include tcp or
        udp) allows it. Defaults and ``any`` rules never exempt an answer.

        >>> NetworkPolicy.non_local().rebind_exempt("10.1.2.3")
        True
        >>> NetworkPolicy.non_local().rebind_exempt("127.0.0.1")
        False
        """
        gw = normalize_gateway(gateway)
        ip = Flow("egress", "tcp", answer).remote
        for rule in self.rules:
            dest = rule.destination
            if not rule.applies_to("egress") or dest.kind not in ("cidr", "group") or rule.ports:
                continue
            if rule.protocols and not ({"tcp", "udp"} & rule.protocols):
                continue
            if _address_matches(dest, ip, gw):
                return rule.action == "allow"
        return False

    # -- internals -------------------------------------------------------------------
    def _evaluate(self, flow: Flow, *, want_notes: bool) -> Decision:
        if not isinstance(flow, Flow):
            raise PolicyError(f"evaluate expects a Flow, got {type(flow).__name__}")
        # (action of the rule that nearly matched, hint); only hints for rules that
        # would have decided the other way are worth showing.
        notes: list[tuple[str, str]] = []
        for i, rule in enumerate(self.rules):
            if not rule.applies_to(flow.direction):
                continue
            if not rule.matches_transport(flow.protocol, flow.port):
                if want_notes and _destination_hit(rule, flow)[0]:
                    notes.append((rule.action,
                                  f"note: rule {i} ({rule.describe()}) names this destination "
                                  f"but not {flow.protocol}"
                                  + ("" if flow.port is None else f" port {flow.port}")))
                continue
            hit, how = _destination_hit(rule, flow)
            if hit:
                return Decision(rule.action, i, f"rule {i}: {rule.describe()} matched {how}",
                                _relevant(notes, rule.action))
            if want_notes and how:
                notes.append((rule.action, f"note: rule {i} ({rule.describe()}) {how}"))
        default = self.default_egress if flow.direction == "egress" else self.default_ingress
        extra = f" (SNI {flow.sni})" if flow.sni else ""
        return Decision(default, None, f"no rule matched {flow.describe()}{extra}; "
                                       f"default {flow.direction} is {default}",
                        _relevant(notes, default))


def _relevant(notes: list[tuple[str, str]], decided: str) -> tuple[str, ...]:
    return tuple(text for action, text in notes if action != decided)


def _address_matches(dest: Destination, ip: IPAddress, gateway: tuple[IPAddress, ...]) -> bool:
    if dest.kind == "cidr":
        net = dest.network
        return net.version == ip.version and ip in net
    if dest.kind == "group":
        return classify_group(ip, gateway) == dest.value
    return dest.kind == "any"


def _destination_hit(rule: Rule, flow: Flow) -> tuple[bool, str]:
    """(matched, description). When not matched, the description is a near-miss hint
    worth reporting, or empty."""
    dest = rule.destination
    ip = flow.remote
    if dest.kind == "any":
        return True, str(ip)
    if dest.kind == "cidr":
        return (_address_matches(dest, ip, flow.gateway), str(ip))
    if dest.kind == "group":
        group = classify_group(ip, flow.gateway)
        if group == dest.value:
            return True, f"{ip} ({group})"
        return False, ""
    assert dest.value is not None
    target = dest.value

    def m(name: str) -> bool:
        return name == target if dest.kind == "domain" else suffix_matches(target, name)

    pinned = sorted(n for n in flow.names if m(n))
    if flow.sni is not None:
        if not m(flow.sni):
            return False, ""
        if rule.action == "deny":
            return True, f"SNI {flow.sni}"
        if pinned:
            return True, f"SNI {flow.sni} (pinned to {ip})"
        return False, (f"matched SNI {flow.sni} but {ip} is not pinned to that name: resolve "
                       "it through the sandbox's DNS first")
    if pinned:
        return True, f"cached name {pinned[0]} for {ip}"
    if not flow.names:
        return False, f"did not match: no hostname is known for {ip} (no SNI, no DNS answer)"
    return False, ""


