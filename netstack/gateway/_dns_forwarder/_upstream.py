"""Upstream selection: the resolvers a forwarder asks, given or from ``resolv.conf``.

:class:`Upstream` is one resolver (IP and port). :func:`resolv_conf_upstreams` reads a
resolv.conf with dnspython (``dns.resolver.Resolver.read_resolv_conf``, the parser
every dnspython client uses) and keeps its ``nameserver`` entries; a link-local
address's ``%scope`` is dropped. Errors, all :class:`~netstack.errors.DnsForwarderError`
naming the file:

* a file that cannot be opened or read;
* a file dnspython rejects as a whole (a ``nameserver`` that is not an IP address, a
  ``search``/``domain`` that is not a domain name, bytes that are not UTF-8): the
  forwarder does not guess which of its entries to trust; pass ``upstreams=`` instead;
* an entry dnspython accepts but a forwarder cannot use (a DNS-over-HTTPS URL).

A file without ``nameserver`` lines gives ``[]`` (the forwarder then refuses to start
with "no upstream resolvers").

>>> import tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "r")
>>> _ = open(p, "w").write("search example\\nnameserver 192.0.2.53\\nnameserver fe80::1%eth0\\n")
>>> resolv_conf_upstreams(p)
[Upstream(host='192.0.2.53', port=53), Upstream(host='fe80::1', port=53)]
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.resolver

from netstack.errors import DnsForwarderError

_BRACKETED = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?")


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
            m = _BRACKETED.fullmatch(value)
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
    """The ``nameserver`` entries of a resolv.conf, read by dnspython (see the module
    docstring for what raises :class:`~netstack.errors.DnsForwarderError`).

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "r"); _ = open(p, "w").write("nameserver 10.0.0.53\\n")
    >>> resolv_conf_upstreams(p)
    [Upstream(host='10.0.0.53', port=53)]
    >>> _ = open(p, "w").write("nameserver dns.example\\n")
    >>> resolv_conf_upstreams(p)
    Traceback (most recent call last):
    ...
    netstack.errors.DnsForwarderError: resolver configuration '...' is not valid (nameserver dns.example is not ...): pass upstreams= instead
    """
    if not isinstance(path, str | Path):
        raise DnsForwarderError(f"resolv_conf must be a path, got {path!r}")
    resolver = dns.resolver.Resolver(configure=False)
    try:
        resolver.read_resolv_conf(str(path))
    except dns.resolver.NoResolverConfiguration as e:
        if str(e) == "no nameservers":
            return []
        # dnspython says "cannot open <path>" for any OSError; the reason is ours to find
        try:
            Path(path).read_bytes()
            reason = str(e)
        except OSError as os_error:
            reason = str(os_error)
        raise DnsForwarderError(f"cannot read resolver configuration {str(path)!r}: "
                                f"{reason}") from e
    except (ValueError, dns.exception.DNSException) as e:   # UnicodeDecodeError is one
        raise DnsForwarderError(f"resolver configuration {str(path)!r} is not valid ({e}): "
                                f"pass upstreams= instead") from e
    result: list[Upstream] = []
    for server in resolver.nameservers:
        text = str(server).split("%", 1)[0]
        try:
            result.append(Upstream.parse(text))
        except DnsForwarderError:
            raise DnsForwarderError(f"resolver configuration {str(path)!r}: nameserver "
                                    f"{str(server)!r} is not an IP address a forwarder can "
                                    f"use: pass upstreams= instead") from None
    return result
