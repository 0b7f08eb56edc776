"""A raw DNS response builder for the pin-cache tests and benchmarks (no name compression,
records in the order given: the shapes dnspython does not write, such as a CNAME chain
whose owners follow the previous target, or odd TTLs per record).

>>> len(build_response("a.test", [("a", "192.0.2.1", 5)]))
46
"""

from __future__ import annotations

import struct

from netstack import normalize_ip

TYPES = {"a": 1, "aaaa": 28, "cname": 5}


def _name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out += bytes([len(raw)]) + raw
    return out + b"\x00"


def build_response(qname: str, answers: list[tuple[str, str, int]], *, qtype: str = "a",
                   rcode: int = 0, ident: int = 0x1234, owner: str | None = None) -> bytes:
    """Build a DNS response (no compression).

    ``answers`` are ``(type, value, ttl)`` with type ``a``, ``aaaa`` or ``cname``;
    each record's owner is the previous CNAME target (or ``owner``/``qname``).

    >>> build_response("a.test", [], rcode=3)[3] & 0x0F
    3
    """
    head = struct.pack("!HHHHHH", ident, 0x8180 | (rcode & 0xF), 1, len(answers), 0, 0)
    msg = head + _name(qname) + struct.pack("!HH", TYPES[qtype], 1)
    cur = owner or qname
    for kind, value, ttl in answers:
        rdata = _name(value) if kind == "cname" else normalize_ip(value).packed
        msg += _name(cur) + struct.pack("!HHIH", TYPES[kind], 1, ttl, len(rdata)) + rdata
        if kind == "cname":
            cur = value
    return msg
