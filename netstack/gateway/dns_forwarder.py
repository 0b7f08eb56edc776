"""The sandbox's DNS forwarder: policy per query, rebind protection, pin-cache feed.

Behaviour (reference: microsandbox DNS interception, §4):

* A message that is not a query is dropped; one too short to have a header is dropped;
  one that does not parse, or that has != 1 question, gets FORMERR; opcodes other
  than QUERY get NOTIMP. The transaction id (and opcode, RD) is always preserved.
* ``policy_decider(qname, protocol, port) -> Decision`` (e.g.
  ``NetworkPolicy.evaluate_dns``) decides each query; deny -> **NXDOMAIN** (never
  REFUSED: glibc retries REFUSED forever). Every decision is logged on the
  ``netstack.dns`` logger with its reason (denies at INFO, allows at DEBUG).
* The host alias (e.g. ``host.microvm.internal``) is answered locally with the
  gateway addresses (TTL 60); other types for it get an empty NOERROR. A/AAAA queries
  for an address family the sandbox lacks (``inactive_families``) get an empty NOERROR.
* Everything else goes to the upstreams (configuration, else the host's
  ``/etc/resolv.conf``) in order, each with ``timeout`` seconds; a timeout or transport
  error fails over to the next, an answer (including SERVFAIL/REFUSED) is returned as
  is; when none answers the client gets SERVFAIL. A truncated UDP answer is retried
  over TCP at the same upstream.
* Rebind protection (default on): if any A/AAAA record in a NOERROR answer is a
  private/reserved address (:func:`is_rebind_address`) and the policy does not exempt
  it (``NetworkPolicy.rebind_exempt``: an explicit address-only allow rule), the client
  gets NXDOMAIN.
* Answers to A/AAAA queries that reach the client are reported to
  ``on_answer(qname, [(ip, ttl), ...])``: addresses owned by the query name or by a
  CNAME target reachable from it; each TTL is the minimum over the CNAME links and
  the address record, floored at ``ttl_floor`` (1 s) and capped at ``ttl_ceiling``.
  Callback errors are logged, never fatal. Empty answers are not reported.
* UDP answers larger than the client's EDNS payload size (512 without OPT) become a
  header-only reply with TC=1, so the client retries over TCP.

Use it bytes-in/bytes-out (``await fwd.handle(wire, "udp")``) from a frame loop, or
run real listeners with :meth:`DnsForwarder.start` (UDP and TCP on one address).

>>> import asyncio
>>> from netstack import NetworkPolicy
>>> fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, upstreams=["192.0.2.1"])
>>> import dns.message
>>> q = dns.message.make_query("example.com", "A")
>>> r = dns.message.from_wire(asyncio.run(fwd.handle(q.to_wire())))
>>> dns.rcode.to_text(r.rcode()), r.id == q.id
('NXDOMAIN', True)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from netstack.errors import DnsForwarderError
from netstack.flow import Decision, Flow

log = logging.getLogger("netstack.dns")

_HOST_ALIAS_TTL: Final = 60
_UDP_DEFAULT_SIZE: Final = 512
_UPSTREAM_PAYLOAD: Final = 1232
_TCP_IDLE_TIMEOUT: Final = 30.0
#: getsockopt name of the pre-NAT destination (SO_ORIGINAL_DST = IP6T_SO_ORIGINAL_DST)
_SO_ORIGINAL_DST: Final = 80

_REBIND_V4: Final = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
    "100.64.0.0/10", "169.254.0.0/16", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"))
_REBIND_V6: Final = tuple(ipaddress.IPv6Network(n) for n in (
    "::1/128", "::/128", "ff00::/8", "fc00::/7", "fe80::/10", "fec0::/10", "100::/64",
    "64:ff9b:1::/48", "2001:db8::/32", "3fff::/20"))


def is_rebind_address(ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a DNS answer address is private/reserved for rebind protection.

    IPv4-mapped IPv6 addresses are judged as IPv4. Note that the TEST-NET ranges are
    in the set (they are reserved), exactly as in the reference.

    >>> is_rebind_address("10.1.2.3"), is_rebind_address("8.8.8.8")
    (True, False)
    >>> is_rebind_address("::ffff:127.0.0.1"), is_rebind_address("2606:4700::1")
    (True, False)
    """
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return any(addr in n for n in _REBIND_V4)
    return any(addr in n for n in _REBIND_V6)


class PolicyDecider(Protocol):
    """``NetworkPolicy.evaluate_dns``-shaped: ``(qname, protocol, port) -> Decision``."""

    def __call__(self, qname: str, protocol: str = ..., port: int = ...) -> Decision: ...


AnswerCallback = Callable[[str, list[tuple[str, int]]], None]
RebindExempt = Callable[[str], bool]
#: ``(resolver ip, protocol, port) -> Decision`` for queries sent to a guest-chosen resolver.
EgressDecider = Callable[[str, str, int], Decision]


class PinSink(Protocol):
    """Anything with ``PinCache.pin(name, addresses, ttl)``'s signature."""

    def pin(self, name: str, addresses: Iterable[str], ttl: float) -> int: ...


def pin_cache_callback(pins: PinSink) -> AnswerCallback:
    """An ``on_answer`` callback that pins each answer into ``pins`` (e.g. the C PinCache).

    The cache keeps one TTL per name and family, so the smallest TTL of the answer is used.

    >>> class Pins:
    ...     def pin(self, name, addresses, ttl):
    ...         print(name, list(addresses), ttl); return 1
    >>> pin_cache_callback(Pins())("a.test", [("192.0.2.1", 30), ("192.0.2.2", 20)])
    a.test ['192.0.2.1', '192.0.2.2'] 20
    """

    def on_answer(qname: str, answers: list[tuple[str, int]]) -> None:
        if answers:
            pins.pin(qname, [ip for ip, _ in answers], min(ttl for _, ttl in answers))

    return on_answer


@dataclass(frozen=True)
class Upstream:
    """One upstream resolver (IP and port).

    >>> Upstream.parse("[2001:db8::53]:5353")
    Upstream(host='2001:db8::53', port=5353)
    """

    host: str
    port: int = 53

    @classmethod
    def parse(cls, value: str | tuple[str, int] | Upstream) -> Upstream:
        """Parse ``IP``, ``IP:PORT``, ``[IPv6]:PORT``, a bare IPv6 or an ``(ip, port)`` tuple.

        >>> Upstream.parse("127.0.0.1:5300"), Upstream.parse("::1")
        (Upstream(host='127.0.0.1', port=5300), Upstream(host='::1', port=53))
        >>> Upstream.parse("dns.example")
        Traceback (most recent call last):
        ...
        netstack.errors.DnsForwarderError: upstream must be IP, IP:PORT or [IPv6]:PORT, got 'dns.example'
        """
        if isinstance(value, Upstream):
            return value
        host: object
        port: object
        if isinstance(value, tuple) and len(value) == 2:
            host, port = value
        elif isinstance(value, str):
            m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?", value)
            if m:
                host, port = m.group(1), int(m.group(2) or 53)
            elif value.count(":") == 1:
                h, _, p = value.partition(":")
                host, port = h, int(p) if p.isdigit() else -1
            else:
                host, port = value, 53
        else:
            raise DnsForwarderError(f"upstream must be IP, IP:PORT or [IPv6]:PORT, "
                                    f"got {value!r}")
        try:
            ipaddress.ip_address(str(host))
        except ValueError:
            raise DnsForwarderError(f"upstream must be IP, IP:PORT or [IPv6]:PORT, "
                                    f"got {value!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise DnsForwarderError(f"upstream port must be 1..65535, got {value!r}")
        return cls(str(ipaddress.ip_address(str(host))), port)


def resolv_conf_upstreams(path: str | Path = "/etc/resolv.conf") -> list[Upstream]:
    """The ``nameserver`` entries of a resolv.conf (unparseable ones are skipped).

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "r"); _ = open(p, "w").write("nameserver 10.0.0.53\\n")
    >>> resolv_conf_upstreams(p)
    [Upstream(host='10.0.0.53', port=53)]
    """
    result: list[Upstream] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DnsForwarderError(f"cannot read resolver configuration {str(path)!r}: {e}") from e
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                result.append(Upstream.parse(parts[1].split("%", 1)[0]))
            except DnsForwarderError:
                log.warning("ignoring nameserver %r in %s", parts[1], path)
    return result


def _addresses(rrset: dns.rrset.RRset) -> list[str]:
    """The addresses of an IN A/AAAA rrset (other classes parse as opaque rdata)."""
    if rrset.rdclass != dns.rdataclass.IN or rrset.rdtype not in (dns.rdatatype.A,
                                                                  dns.rdatatype.AAAA):
        return []
    return [str(rd.address) for rd in rrset if isinstance(getattr(rd, "address", None), str)]


def _header_only(query_id: int, flags: int, rcode: int, *, tc: bool = False) -> bytes:
    """A reply with no sections: QR set, opcode and RD copied from ``flags``, RA set."""
    out = dns.flags.QR | dns.flags.RA | (flags & (0x7800 | dns.flags.RD))
    if tc:
        out |= dns.flags.TC
    return struct.pack("!HHHHHH", query_id, out | (rcode & 0xF), 0, 0, 0, 0)


class DnsForwarder:
    """Policy-enforcing DNS forwarder (see the module docstring for the rules).

    ``gateway``: the gateway addresses (answers for ``host_alias``; passed to the
    policy's rebind exemption). ``rebind_exempt``: ``ip -> bool``; by default taken from
    the policy behind ``policy_decider`` (``NetworkPolicy.rebind_exempt``), else nothing
    is exempt. ``egress_decider``: ``(ip, protocol, port) -> Decision`` for queries the
    guest sent to another resolver; by default the policy's ``evaluate`` of that egress
    flow, else such queries are denied. ``inactive_families`` (``"ipv4"``/``"ipv6"``):
    A/AAAA queries of a family the sandbox does not have get an empty NOERROR without
    being forwarded (:meth:`for_plan` marks IPv6 inactive unless the plan has it).

    >>> from netstack import NetworkPolicy
    >>> fwd = DnsForwarder(NetworkPolicy.public_only().evaluate_dns, upstreams=["127.0.0.1:5353"],
    ...                    host_alias="host.microvm.internal", gateway=["172.16.0.1"])
    >>> fwd.upstreams
    [Upstream(host='127.0.0.1', port=5353)]
    """

    def __init__(self, policy_decider: PolicyDecider,
                 upstreams: Sequence[str | tuple[str, int] | Upstream] | None = None, *,
                 timeout: float = 5.0, rebind_protection: bool = True,
                 on_answer: AnswerCallback | None = None, host_alias: str | None = None,
                 gateway: Iterable[str] = (), rebind_exempt: RebindExempt | None = None,
                 resolv_conf: str | Path = "/etc/resolv.conf", ttl_floor: int = 1,
                 ttl_ceiling: int | None = None,
                 egress_decider: EgressDecider | None = None,
                 inactive_families: Iterable[str] = ()) -> None:
        if not callable(policy_decider):
            raise DnsForwarderError(f"policy_decider must be callable like "
                                    f"NetworkPolicy.evaluate_dns, got {policy_decider!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
                or not 0 < timeout <= 60:
            raise DnsForwarderError(f"timeout must be a number of seconds in (0, 60], "
                                    f"got {timeout!r}")
        if isinstance(ttl_floor, bool) or not isinstance(ttl_floor, int) or ttl_floor < 0:
            raise DnsForwarderError(f"ttl_floor must be an int >= 0, got {ttl_floor!r}")
        if ttl_ceiling is not None and (isinstance(ttl_ceiling, bool)
                                        or not isinstance(ttl_ceiling, int)
                                        or ttl_ceiling < max(1, ttl_floor)):
            raise DnsForwarderError(f"ttl_ceiling must be None or an int >= ttl_floor, "
                                    f"got {ttl_ceiling!r}")
        self.policy_decider = policy_decider
        if upstreams is None:
            self.upstreams = resolv_conf_upstreams(resolv_conf)
        else:
            if isinstance(upstreams, str):
                upstreams = [upstreams]
            self.upstreams = [Upstream.parse(u) for u in upstreams]
        if not self.upstreams:
            raise DnsForwarderError(f"no upstream resolvers: none configured and none in "
                                    f"{str(resolv_conf)!r}")
        self.timeout = float(timeout)
        self.rebind_protection = bool(rebind_protection)
        self.on_answer = on_answer
        self.gateway = tuple(str(ipaddress.ip_address(g)) for g in gateway)
        self.host_alias: dns.name.Name | None = None
        if host_alias is not None:
            try:
                self.host_alias = dns.name.from_text(host_alias)
            except dns.exception.DNSException as e:
                raise DnsForwarderError(f"host_alias {host_alias!r} is not a domain name: {e}")
            if not self.gateway:
                raise DnsForwarderError(f"host_alias {host_alias!r} needs the gateway "
                                        f"addresses (gateway=[...])")
        if rebind_exempt is None:
            owner: Any = getattr(policy_decider, "__self__", None)
            method = getattr(owner, "rebind_exempt", None)
            if callable(method):
                gw = self.gateway

                def rebind_exempt(ip: str) -> bool:
                    return bool(method(ip, gw))
        self.rebind_exempt = rebind_exempt
        if egress_decider is None:
            evaluate = getattr(getattr(policy_decider, "__self__", None), "evaluate", None)
            if callable(evaluate):
                def egress_decider(ip: str, protocol: str, port: int) -> Decision:
                    return cast(Decision, evaluate(Flow("egress", protocol, ip, port)))
        self.egress_decider = egress_decider
        families = set(inactive_families) if not isinstance(inactive_families, str) \
            else {inactive_families}
        if not families <= {"ipv4", "ipv6"}:
            raise DnsForwarderError(f"inactive_families must name 'ipv4' and/or 'ipv6', "
                                    f"got {sorted(families)!r}")
        self.inactive_types = {dns.rdatatype.A if f == "ipv4" else dns.rdatatype.AAAA
                               for f in families}
        self.ttl_floor = ttl_floor
        self.ttl_ceiling = ttl_ceiling
        self.stats: dict[str, int] = dict.fromkeys(
            ("queries", "denied", "forwarded", "alias", "formerr", "servfail", "truncated",
             "rebind_blocked", "dropped", "failovers"), 0)
        self._servers: list[asyncio.AbstractServer | asyncio.DatagramTransport] = []

    @classmethod
    def for_plan(cls, policy: Any, plan: Any, **kwargs: Any) -> DnsForwarder:
        """Forwarder for a sandbox: ``policy.evaluate_dns`` + the plan's alias and gateway.

        >>> from netstack import NetworkPolicy
        >>> from netstack.gateway import AddressPlan
        >>> f = DnsForwarder.for_plan(NetworkPolicy.public_only(), AddressPlan(0),
        ...                           upstreams=["127.0.0.1"])
        >>> f.gateway, str(f.host_alias), f.inactive_types == {dns.rdatatype.AAAA}
        (('172.16.0.1',), 'host.microvm.internal.', True)
        """
        kwargs.setdefault("host_alias", plan.host_alias)
        kwargs.setdefault("gateway", plan.gateway_addresses)
        kwargs.setdefault("inactive_families", () if plan.ipv6 else ("ipv6",))
        return cls(policy.evaluate_dns, **kwargs)

    # -- the bytes-in / bytes-out entry point ----------------------------------------
    async def handle(self, wire: bytes, protocol: str = "udp",
                     dst: str | tuple[str, int] | None = None) -> bytes | None:
        """Answer one DNS message from the guest; None means "send nothing".

        ``protocol`` is ``"udp"`` or ``"tcp"`` (without the TCP length prefix); it
        selects the policy transport and the truncation rule. ``dst`` is the address
        (or ``(address, port)``) the guest sent the query to: None or a gateway address
        means "our resolver" (the configured upstreams, with failover); any other
        address is a resolver the guest chose (``dig @1.1.1.1``): after the per-name
        decision, the egress policy for ``dst:port/protocol`` decides (deny ->
        NXDOMAIN) and an allowed query goes to that resolver only, without failover.

        >>> import asyncio
        >>> from netstack import NetworkPolicy
        >>> fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, upstreams=["192.0.2.1"])
        >>> asyncio.run(fwd.handle(b"\\x12\\x34\\x01\\x00" + bytes(8)))[:4].hex()  # no question
        '12348181'
        """
        if protocol not in ("udp", "tcp"):
            raise DnsForwarderError(f"protocol must be 'udp' or 'tcp', got {protocol!r}")
        self.stats["queries"] += 1
        if len(wire) < 12:
            self.stats["dropped"] += 1
            log.debug("dropping %d-byte DNS message (shorter than a header)", len(wire))
            return None
        qid, flags = struct.unpack("!HH", wire[:4])
        if flags & dns.flags.QR:
            self.stats["dropped"] += 1
            return None
        try:
            query = dns.message.from_wire(wire)
        except Exception as e:  # dnspython raises many types on garbage
            self.stats["formerr"] += 1
            log.info("DNS FORMERR for unparseable query id %d: %s", qid, e)
            return _header_only(qid, flags, dns.rcode.FORMERR)
        if query.opcode() != dns.opcode.QUERY:
            return _header_only(qid, flags, dns.rcode.NOTIMP)
        if len(query.question) != 1:
            self.stats["formerr"] += 1
            log.info("DNS FORMERR: query id %d has %d questions (need exactly 1)", qid,
                     len(query.question))
            return _header_only(qid, flags, dns.rcode.FORMERR)
        target = None if dst is None else Upstream.parse(dst)
        if target is not None and target.host in self.gateway:
            target = None
        response = await self._answer(query, protocol, target)
        return self._render(query, response, protocol)

    # -- internals -------------------------------------------------------------------
    async def _answer(self, query: dns.message.Message, protocol: str,
                      target: Upstream | None) -> dns.message.Message:
        q = query.question[0]
        qname = q.name.to_text(omit_final_dot=True).lower() or "."
        qtype = dns.rdatatype.to_text(q.rdtype)
        try:
            decision = self.policy_decider(qname, protocol, 53)
        except Exception as e:
            log.error("DNS policy decider failed for %s: %s; denying", qname, e)
            decision = Decision("deny", None, f"policy decider failed: {e}")
        if not decision.allowed:
            self.stats["denied"] += 1
            log.info("DNS query %s %s (%s) denied -> NXDOMAIN: %s", qname, qtype, protocol,
                     decision.reason)
            return self._local(query, dns.rcode.NXDOMAIN)
        log.debug("DNS query %s %s (%s) allowed: %s", qname, qtype, protocol, decision.reason)
        if self.host_alias is not None and q.name == self.host_alias:
            self.stats["alias"] += 1
            return self._alias(query)
        if q.rdtype in self.inactive_types:
            # the sandbox has no such family: an empty answer makes resolvers use the other
            log.debug("DNS query %s %s: family inactive -> empty NOERROR", qname, qtype)
            return self._local(query, dns.rcode.NOERROR)
        servers = self.upstreams
        if target is not None:
            verdict = self._egress_decision(target, protocol)
            if not verdict.allowed:
                self.stats["denied"] += 1
                log.info("DNS query %s %s to resolver %s:%d (%s) denied -> NXDOMAIN: %s",
                         qname, qtype, target.host, target.port, protocol, verdict.reason)
                return self._local(query, dns.rcode.NXDOMAIN)
            servers = [target]
        upstream = await self._forward(query, protocol, servers)
        if upstream is None:
            self.stats["servfail"] += 1
            log.warning("DNS query %s %s: no upstream answered -> SERVFAIL", qname, qtype)
            return self._local(query, dns.rcode.SERVFAIL)
        self.stats["forwarded"] += 1
        response = self._local(query, upstream.rcode())
        response.flags |= upstream.flags & (dns.flags.AA | dns.flags.AD)
        response.answer = upstream.answer
        response.authority = upstream.authority
        response.additional = upstream.additional
        if upstream.rcode() == dns.rcode.NOERROR:
            blocked = self._rebind_violation(upstream)
            if blocked is not None:
                self.stats["rebind_blocked"] += 1
                log.info("DNS answer for %s %s carries private address %s -> NXDOMAIN "
                         "(rebind protection; no address-only allow rule exempts it)",
                         qname, qtype, blocked)
                return self._local(query, dns.rcode.NXDOMAIN)
            if q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                self._report(qname, q.name, upstream)
        return response

    def _local(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        response = dns.message.make_response(query, our_payload=_UPSTREAM_PAYLOAD)
        response.flags |= dns.flags.RA
        response.set_rcode(rcode)
        return response

    def _alias(self, query: dns.message.Message) -> dns.message.Message:
        q = query.question[0]
        response = self._local(query, dns.rcode.NOERROR)
        response.flags |= dns.flags.AA
        want = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(q.rdtype)
        addrs = [a for a in self.gateway if ipaddress.ip_address(a).version == want]
        if addrs and q.rdclass == dns.rdataclass.IN:
            response.answer.append(dns.rrset.from_text_list(
                q.name, _HOST_ALIAS_TTL, dns.rdataclass.IN, q.rdtype, addrs))
        return response

    def _egress_decision(self, target: Upstream, protocol: str) -> Decision:
        decide = self.egress_decider
        if decide is None:
            return Decision("deny", None, "no egress policy to judge a guest-chosen resolver "
                                          "(pass egress_decider=)")
        try:
            return decide(target.host, protocol, target.port)
        except Exception as e:
            log.error("DNS egress decider failed for %s: %s; denying", target.host, e)
            return Decision("deny", None, f"egress decider failed: {e}")

    async def _forward(self, query: dns.message.Message, protocol: str,
                       servers: Sequence[Upstream]) -> dns.message.Message | None:
        q = query.question[0]
        up = dns.message.make_query(q.name, q.rdtype, q.rdclass, use_edns=0,
                                    payload=_UPSTREAM_PAYLOAD,
                                    want_dnssec=bool(query.ednsflags & dns.flags.DO))
        up.flags = query.flags & (dns.flags.RD | dns.flags.CD)
        for i, server in enumerate(servers):
            if i:
                self.stats["failovers"] += 1
            try:
                if protocol == "udp":
                    r = await dns.asyncquery.udp(up, server.host, timeout=self.timeout,
                                                 port=server.port, ignore_unexpected=True)
                    if r.flags & dns.flags.TC:
                        r = await dns.asyncquery.tcp(up, server.host, timeout=self.timeout,
                                                     port=server.port)
                else:
                    r = await dns.asyncquery.tcp(up, server.host, timeout=self.timeout,
                                                 port=server.port)
                return r
            except (TimeoutError, dns.exception.DNSException, OSError, EOFError) as e:
                log.info("DNS upstream %s:%d failed for %s (%s: %s); trying the next",
                         server.host, server.port, q.name, type(e).__name__, e)
        return None

    def _rebind_violation(self, upstream: dns.message.Message) -> str | None:
        if not self.rebind_protection:
            return None
        for rrset in upstream.answer:
            for ip in _addresses(rrset):
                if is_rebind_address(ip) and not (self.rebind_exempt is not None
                                                  and self.rebind_exempt(ip)):
                    return ip
        return None

    def _report(self, qname: str, name: dns.name.Name, upstream: dns.message.Message) -> None:
        if self.on_answer is None:
            return
        reach: dict[dns.name.Name, int] = {name: 2**31 - 1}
        changed = True
        while changed:
            changed = False
            for rrset in upstream.answer:
                if rrset.rdtype == dns.rdatatype.CNAME and rrset.rdclass == dns.rdataclass.IN \
                        and rrset.name in reach:
                    ttl = min(reach[rrset.name], rrset.ttl)
                    for rd in rrset:
                        if isinstance(getattr(rd, "target", None), dns.name.Name) \
                                and rd.target not in reach:
                            reach[rd.target] = ttl
                            changed = True
        found: list[tuple[str, int]] = []
        for rrset in upstream.answer:
            ips = _addresses(rrset)
            if ips and rrset.name in reach:
                ttl = max(self.ttl_floor, min(reach[rrset.name], rrset.ttl))
                if self.ttl_ceiling is not None:
                    ttl = min(ttl, self.ttl_ceiling)
                found.extend((ip, ttl) for ip in ips)
        if not found:
            return
        try:
            self.on_answer(qname, found)
        except Exception:
            log.exception("on_answer callback failed for %s", qname)

    def _render(self, query: dns.message.Message, response: dns.message.Message,
                protocol: str) -> bytes:
        if query.edns < 0:
            response.use_edns(False)
        limit = 65535
        if protocol == "udp":
            limit = max(_UDP_DEFAULT_SIZE, query.payload) if query.edns >= 0 \
                else _UDP_DEFAULT_SIZE
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            self.stats["truncated"] += 1
            log.debug("DNS answer for id %d exceeds %d bytes over %s -> TC", query.id, limit,
                      protocol)
            return _header_only(query.id, query.flags, response.rcode(), tc=True)

    # -- listener mode -------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve UDP and TCP on ``host``:``port`` (0 = pick one); returns the address.

        >>> import asyncio
        >>> from netstack import NetworkPolicy
        >>> async def demo():
        ...     fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"])
        ...     host, port = await fwd.start("127.0.0.1", 0)
        ...     await fwd.stop()
        ...     return host, port > 0
        >>> asyncio.run(demo())
        ('127.0.0.1', True)
        """
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._serve_tcp, host, port)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, bound[1]))
        self._servers.append(transport)
        return str(bound[0]), int(bound[1])

    async def start_tcp_socket(self, sock: Any, *, original_dst: bool = False) -> None:
        """Serve DNS over TCP on an already bound and listening socket (e.g. one created
        inside another network namespace); closed by :meth:`stop`. ``original_dst``:
        connections were DNATed to this listener (guest DNS to any address), so each
        connection's pre-NAT destination (``SO_ORIGINAL_DST``) is the resolver the guest
        asked, judged like a UDP query's (see :meth:`handle`).

        >>> import asyncio, socket
        >>> from netstack import NetworkPolicy
        >>> async def demo():
        ...     fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"])
        ...     s = socket.create_server(("127.0.0.1", 0))
        ...     await fwd.start_tcp_socket(s)
        ...     await fwd.stop()
        >>> asyncio.run(demo())
        """
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            dst = None
            if original_dst:
                conn = writer.get_extra_info("socket")
                dst = original_destination(conn) if conn is not None else None
            await self._serve_tcp(reader, writer, dst)

        server = await asyncio.start_server(serve, sock=sock)
        self._servers.append(server)

    async def stop(self) -> None:
        """Close the listeners started by :meth:`start` (idempotent).

        >>> import asyncio
        >>> from netstack import NetworkPolicy
        >>> fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"])
        >>> asyncio.run(fwd.stop())  # nothing started: a no-op
        """
        servers, self._servers = self._servers, []
        for s in servers:
            s.close()
            if isinstance(s, asyncio.AbstractServer):
                await s.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         dst: tuple[str, int] | None = None) -> None:
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), _TCP_IDLE_TIMEOUT)
                (length,) = struct.unpack("!H", header)
                wire = await asyncio.wait_for(reader.readexactly(length), self.timeout)
                answer = await self.handle(wire, "tcp", dst)
                if answer is not None:
                    writer.write(struct.pack("!H", len(answer)) + answer)
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def original_destination(sock: Any) -> tuple[str, int] | None:
    """The pre-NAT destination of an accepted TCP socket (``SO_ORIGINAL_DST``, IPv4 or
    IPv6), or None when conntrack has no record of it (not NATed, or no conntrack).

    >>> import socket
    >>> a, b = socket.socketpair()
    >>> original_destination(a) is None
    True
    """
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            return str(ipaddress.IPv6Address(packed)), int(port)
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return str(ipaddress.IPv4Address(packed)), int(port)
    except (OSError, struct.error):
        pass
    return None


class ForwarderThread:
    """A :class:`DnsForwarder` served by its own event loop in a daemon thread.

    For callers that are not asyncio (the C frame loop's slow path): :meth:`submit`
    from any thread returns a ``concurrent.futures.Future`` of the reply bytes.

    >>> from netstack import NetworkPolicy
    >>> fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"])
    >>> with ForwarderThread(fwd) as t:
    ...     reply = t.submit(bytes.fromhex("abcd01000001000000000000017800000f0001")).result(5)
    >>> reply[:2].hex(), reply[3] & 0xF   # NXDOMAIN (3), id preserved
    ('abcd', 3)
    """

    def __init__(self, forwarder: DnsForwarder) -> None:
        self.forwarder = forwarder
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="netstack-dns")
        self._thread.start()

    def submit(self, wire: bytes, protocol: str = "udp",
               dst: str | tuple[str, int] | None = None
               ) -> concurrent.futures.Future[bytes | None]:
        """Schedule :meth:`DnsForwarder.handle` on the forwarder's loop.

        >>> from netstack import NetworkPolicy
        >>> with ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns,
        ...                                   ["192.0.2.1"])) as t:
        ...     t.submit(b"\\x00\\x01").result(5) is None  # too short: no reply
        True
        """
        if self.loop.is_closed():
            raise DnsForwarderError("the forwarder thread is closed")
        return asyncio.run_coroutine_threadsafe(self.forwarder.handle(wire, protocol, dst),
                                                self.loop)

    def start_listener(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Start the UDP+TCP listeners (:meth:`DnsForwarder.start`) on the thread's loop.

        >>> from netstack import NetworkPolicy
        >>> with ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns,
        ...                                   ["192.0.2.1"])) as t:
        ...     t.start_listener("127.0.0.1", 0)[1] > 0
        True
        """
        return asyncio.run_coroutine_threadsafe(self.forwarder.start(host, port),
                                                self.loop).result(10)

    def serve_tcp_socket(self, sock: Any, *, original_dst: bool = False) -> None:
        """:meth:`DnsForwarder.start_tcp_socket` on the thread's loop.

        >>> import socket
        >>> from netstack import NetworkPolicy
        >>> with ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns,
        ...                                   ["192.0.2.1"])) as t:
        ...     t.serve_tcp_socket(socket.create_server(("127.0.0.1", 0)))
        """
        asyncio.run_coroutine_threadsafe(
            self.forwarder.start_tcp_socket(sock, original_dst=original_dst),
            self.loop).result(10)

    def close(self) -> None:
        """Stop listeners and the loop, join the thread (idempotent).

        >>> from netstack import NetworkPolicy
        >>> t = ForwarderThread(DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"]))
        >>> t.close(); t.close(); t.loop.is_closed()
        True
        """
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()

    async def _shutdown(self) -> None:
        """Stop the listeners, then cancel and await every other task on the loop
        (queries in flight, TCP connections, upstream waits), so that nothing is left
        pending when the loop stops ("Task was destroyed but it is pending!") and no
        transport closes itself on a closed loop ("Event loop is closed")."""
        await self.forwarder.stop()
        me = asyncio.current_task()
        for _ in range(3):   # a cancelled task may start a cleanup task of its own
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=5)
        await asyncio.sleep(0)   # let transports run their connection_lost callbacks
        await self.loop.shutdown_asyncgens()

    def __enter__(self) -> ForwarderThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, forwarder: DnsForwarder) -> None:
        self.forwarder = forwarder
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._reply(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            answer = await self.forwarder.handle(data, "udp")
        except Exception:
            log.exception("DNS forwarder failed on a UDP query from %s", addr)
            return
        if answer is not None and self.transport is not None \
                and not self.transport.is_closing():
            self.transport.sendto(answer, addr)
