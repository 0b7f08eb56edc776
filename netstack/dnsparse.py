"""DNS response parsing in C (what the pin cache learns from).

>>> from netstack import parse_dns_response
>>> from netstack.dnsparse import build_response
>>> r = parse_dns_response(build_response("www.example.com", [("cname", "cdn.example.net", 60),
...                                                           ("a", "192.0.2.10", 30)]))
>>> r.qname, r.chain, [str(a) for a, _ in r.addresses], r.ttl
('www.example.com', ('cdn.example.net',), ['192.0.2.10'], 30)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netstack._fastpath import ffi, lib
from netstack._ipbytes import from16
from netstack.addresses import IPAddress, normalize_ip
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

    >>> parse_dns_response(build_response("a.test", [], rcode=3)).rcode
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


def _name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out += bytes([len(raw)]) + raw
    return out + b"\x00"


def build_response(qname: str, answers: list[tuple[str, str, int]], *, qtype: str = "a",
                   rcode: int = 0, ident: int = 0x1234, owner: str | None = None) -> bytes:
    """Build a DNS response (test and benchmark helper; no compression).

    ``answers`` are ``(type, value, ttl)`` with type ``a``, ``aaaa`` or ``cname``;
    each record's owner is the previous CNAME target (or ``owner``/``qname``).

    >>> len(build_response("a.test", [("a", "192.0.2.1", 5)]))
    46
    """
    types = {"a": 1, "aaaa": 28, "cname": 5}
    head = struct.pack("!HHHHHH", ident, 0x8180 | (rcode & 0xF), 1, len(answers), 0, 0)
    msg = head + _name(qname) + struct.pack("!HH", types[qtype], 1)
    cur = owner or qname
    for kind, value, ttl in answers:
        rdata = _name(value) if kind == "cname" else normalize_ip(value).packed
        msg += _name(cur) + struct.pack("!HHIH", types[kind], 1, ttl, len(rdata)) + rdata
        if kind == "cname":
            cur = value
    return msg
