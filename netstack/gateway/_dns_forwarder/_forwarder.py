"""The forwarder: policy per query, rebind protection, the pin-cache feed, rendering.

:class:`DnsForwarder` turns one guest DNS message into one reply (bytes in, bytes out;
see :mod:`netstack.gateway._dns_forwarder` for the rules); the listeners
(:mod:`._listeners`), upstream selection (:mod:`._upstream`) and the loop thread
(:mod:`._thread`) are separate modules. :func:`is_rebind_address` is the rebind set,
:func:`pin_cache_callback` feeds answers to a pin cache.

>>> import asyncio, dns.message
>>> from netstack import NetworkPolicy
>>> fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, upstreams=["192.0.2.1"])
>>> r = dns.message.from_wire(asyncio.run(fwd.handle(dns.message.make_query("a.test", "A").to_wire())))
>>> dns.rcode.to_text(r.rcode())
'NXDOMAIN'
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
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

from netstack._flow import Decision, Flow
from netstack.errors import DnsForwarderError
from netstack.gateway._dns_forwarder._listeners import Listeners, Lookup
from netstack.gateway._dns_forwarder._upstream import Upstream, resolv_conf_upstreams

log = logging.getLogger("netstack.dns")

_HOST_ALIAS_TTL: Final = 60
_UDP_DEFAULT_SIZE: Final = 512
_UPSTREAM_PAYLOAD: Final = 1232

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
    """``NetworkPolicy.evaluate_dns``-shaped: ``(qname, protocol, port) -> Decision``.

    >>> from netstack import NetworkPolicy
    >>> decide: PolicyDecider = NetworkPolicy.none().evaluate_dns
    >>> decide("example.com", "udp", 53).allowed
    False
    """

    def __call__(self, qname: str, protocol: str = ..., port: int = ...) -> Decision: ...


AnswerCallback = Callable[[str, list[tuple[str, int]]], None]
RebindExempt = Callable[[str], bool]
#: ``(resolver ip, protocol, port) -> Decision`` for queries sent to a guest-chosen resolver.
EgressDecider = Callable[[str, str, int], Decision]


class PinSink(Protocol):
    """Anything with ``PinCache.pin(name, addresses, ttl)``'s signature.

    >>> class Pins:
    ...     def pin(self, name: str, addresses, ttl: float) -> int:
    ...         return len(list(addresses))
    >>> sink: PinSink = Pins()
    >>> sink.pin("a.test", ["192.0.2.1"], 30)
    1
    """

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
        self._listeners = Listeners(self.handle, self.timeout)

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

    # -- listener mode (netstack.gateway._dns_forwarder._listeners) -----------------
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
        return await self._listeners.start(host, port)

    async def start_tcp_socket(self, sock: socket.socket, *, original_dst: bool = False,
                               lookup: Lookup | None = None) -> None:
        """Serve DNS over TCP on an already bound and listening socket (e.g. one created
        inside another network namespace); closed by :meth:`stop`. ``original_dst``:
        connections were DNATed to this listener (guest DNS to any address), so each
        connection's pre-NAT destination (``SO_ORIGINAL_DST``) is the resolver the guest
        asked, judged like a UDP query's (see :meth:`handle`). ``lookup(peer, local)``:
        that destination comes from this callback instead (a steering pool's listener);
        a connection it answers None for is closed.

        >>> import asyncio, socket
        >>> from netstack import NetworkPolicy
        >>> async def demo():
        ...     fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"])
        ...     s = socket.create_server(("127.0.0.1", 0))
        ...     await fwd.start_tcp_socket(s)
        ...     await fwd.stop()
        >>> asyncio.run(demo())
        """
        await self._listeners.start_tcp_socket(sock, original_dst=original_dst,
                                               lookup=lookup)

    async def stop(self) -> None:
        """Close the listeners started by :meth:`start` (idempotent).

        >>> import asyncio
        >>> from netstack import NetworkPolicy
        >>> fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, ["192.0.2.1"])
        >>> asyncio.run(fwd.stop())  # nothing started: a no-op
        """
        await self._listeners.stop()
