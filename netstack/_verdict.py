"""The per-frame verdicts of the C fast path (one byte per frame).

>>> from netstack import Verdict
>>> Verdict(2).name, Verdict.DENY_RST.label
('DENY_RST', 'deny-with-reset')
"""

from __future__ import annotations

import enum


class Verdict(enum.IntEnum):
    """What the gateway must do with a frame.

    * ``ALLOW`` forward it; ``DENY`` drop it silently (ICMP, other protocols);
    * ``DENY_RST`` drop it and answer the guest with a TCP RST;
    * ``DENY_ICMP`` drop it and answer with ICMP(v6) destination unreachable;
    * ``NEED_MORE`` hold it: the TCP flow waits for its TLS ClientHello (SNI);
    * ``TO_DNS`` a DNS query (UDP/TCP port 53 to any address) for the forwarder;
    * ``TO_PROXY`` TLS to a host the TLS proxy intercepts;
    * ``MALFORMED`` the frame could not be parsed (drop it).

    ARP frames get ``ALLOW`` (for the gateway's own ARP responder); IP
    protocols other than TCP/UDP/ICMP get ``DENY``.

    >>> Verdict.TO_DNS.label
    'to-dns'
    """

    ALLOW = 0
    DENY = 1
    DENY_RST = 2
    DENY_ICMP = 3
    NEED_MORE = 4
    TO_DNS = 5
    TO_PROXY = 6
    MALFORMED = 7

    @property
    def label(self) -> str:
        """The issue's spelling: ``allow``, ``deny``, ``deny-with-reset`` ...

        >>> Verdict.DENY_ICMP.label
        'deny-with-icmp-unreachable'
        """
        return _LABELS[self]


_LABELS = {
    Verdict.ALLOW: "allow",
    Verdict.DENY: "deny",
    Verdict.DENY_RST: "deny-with-reset",
    Verdict.DENY_ICMP: "deny-with-icmp-unreachable",
    Verdict.NEED_MORE: "need-more",
    Verdict.TO_DNS: "to-dns",
    Verdict.TO_PROXY: "to-proxy",
    Verdict.MALFORMED: "malformed",
}
