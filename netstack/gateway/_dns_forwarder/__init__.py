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
run real listeners with :meth:`DnsForwarder.start` (UDP and TCP on one address), or
from a thread that is not asyncio through :class:`ForwarderThread`.

One job per module (this package re-exports the public names):

* ``_upstream``: :class:`Upstream` and :func:`resolv_conf_upstreams` (dnspython reads
  resolv.conf; a file it rejects raises :class:`~netstack.errors.DnsForwarderError`).
* ``_forwarder``: :class:`DnsForwarder` (policy per query, host alias, rebind
  protection, the ``on_answer`` feed, rendering), :func:`is_rebind_address`,
  :func:`pin_cache_callback`.
* ``_listeners``: the UDP/TCP listeners and :func:`original_destination`
  (``SO_ORIGINAL_DST``, from :mod:`netstack.gateway._sockopt`).
* ``_thread``: :class:`ForwarderThread`, the forwarder on a loop thread
  (:mod:`netstack.gateway._portal`, the twin of ``microvm/_portal.py``).

>>> import asyncio
>>> from netstack import NetworkPolicy
>>> fwd = DnsForwarder(NetworkPolicy.none().evaluate_dns, upstreams=["192.0.2.1"])
>>> import dns.message
>>> q = dns.message.make_query("example.com", "A")
>>> r = dns.message.from_wire(asyncio.run(fwd.handle(q.to_wire())))
>>> dns.rcode.to_text(r.rcode()), r.id == q.id
('NXDOMAIN', True)
"""

from netstack.gateway._dns_forwarder._forwarder import (
    AnswerCallback,
    DnsForwarder,
    EgressDecider,
    PinSink,
    PolicyDecider,
    RebindExempt,
    is_rebind_address,
    pin_cache_callback,
)
from netstack.gateway._dns_forwarder._listeners import QueryHandler, original_destination
from netstack.gateway._dns_forwarder._thread import ForwarderThread
from netstack.gateway._dns_forwarder._upstream import Upstream, resolv_conf_upstreams

__all__ = [
    "AnswerCallback",
    "DnsForwarder",
    "EgressDecider",
    "ForwarderThread",
    "PinSink",
    "PolicyDecider",
    "QueryHandler",
    "RebindExempt",
    "Upstream",
    "is_rebind_address",
    "original_destination",
    "pin_cache_callback",
    "resolv_conf_upstreams",
]
