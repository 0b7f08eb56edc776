"""DNS response parsing in C (what the pin cache learns from).

>>> import dns.message, dns.rrset
>>> from netstack import parse_dns_response
>>> answer = dns.message.make_response(dns.message.make_query("www.example.com", "A"))
>>> answer.answer += [
...     dns.rrset.from_text("www.example.com.", 60, "IN", "CNAME", "cdn.example.net."),
...     dns.rrset.from_text("cdn.example.net.", 30, "IN", "A", "192.0.2.10")]
>>> r = parse_dns_response(answer.to_wire())
>>> r.qname, r.chain, [str(a) for a, _ in r.addresses], r.ttl
('www.example.com', ('cdn.example.net',), ['192.0.2.10'], 30)
"""

from __future__ import annotations

from dataclasses import dataclass

from netstack._addresses import IPAddress
from netstack._fastpath import ffi, lib
from netstack._ipbytes import from16
from netstack.errors import MalformedDNS


@dataclass(frozen=True, slots=True)
class DnsResponse:
    """A parsed DNS message: question, RCODE and the addresses of its CNAME chain.

    ``addresses`` are the A/AAAA answers (of the question's type) owned by the
    question name or a CNAME target reachable from it, with their TTLs; ``ttl`` is
    the minimum TTL over those and the contributing CNAMEs (0 without addresses).

    >>> DnsResponse("a.test", 1, 0, 7, True, False, (), (), 0).qname
    'a.test'
    """

    qname: str
    qtype: int
    rcode: int
    id: int
    is_response: bool
    truncated: bool
    chain: tuple[str, ...]
    addresses: tuple[tuple[IPAddress, int], ...]
    ttl: int


def parse_dns_response(message: bytes | bytearray | memoryview) -> DnsResponse:
    """Parse a DNS message (one question; answers followed along the CNAME chain).

    Raises :class:`~netstack.MalformedDNS` for anything malformed (truncated
    records, compression loops or forward pointers, invalid label bytes, chains
    longer than 16).

    >>> import dns.message, dns.rcode
    >>> nxdomain = dns.message.make_response(dns.message.make_query("a.test", "A"))
    >>> nxdomain.set_rcode(dns.rcode.NXDOMAIN)
    >>> parse_dns_response(nxdomain.to_wire()).rcode
    3
    """
    data = ffi.from_buffer("uint8_t[]", message)
    out = ffi.new("ns_dns_result *")
    if lib.ns_parse_dns(data, len(data), out) != 0:
        raise MalformedDNS(f"malformed DNS message ({len(data)} bytes)")
    return DnsResponse(
        qname=bytes(ffi.buffer(out.qname, out.qname_len)).decode("ascii"),
        qtype=int(out.qtype),
        rcode=int(out.rcode),
        id=int(out.id),
        is_response=bool(out.is_response),
        truncated=bool(out.truncated),
        chain=tuple(ffi.string(out.chain[i]).decode("ascii") for i in range(out.nchain)),
        addresses=tuple((from16(bytes(out.addrs[i])), int(out.addr_ttl[i]))
                        for i in range(out.naddrs)),
        ttl=int(out.min_ttl),
    )

