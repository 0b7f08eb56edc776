"""IP address helpers and the destination groups of a sandbox network.

Groups are disjoint and classified in a fixed order (first hit wins), exactly as
upstream microsandbox does it:

======  ============  =====================================================  ==========
order   group         IPv4                                                   IPv6
======  ============  =====================================================  ==========
0       (none)        ``0.0.0.0`` (unspecified)                              ``::``
1       ``host``      the sandbox's gateway IPv4                             gateway v6
2       ``metadata``  ``169.254.169.254``                                    (none)
3       ``loopback``  ``127.0.0.0/8``                                        ``::1``
4       ``private``   ``10/8``, ``172.16/12``, ``192.168/16``, ``100.64/10`` ``fc00::/7``
5       ``link_local`` ``169.254.0.0/16``                                    ``fe80::/10``
6       ``multicast`` ``224.0.0.0/4``                                        ``ff00::/8``
7       ``public``    everything else                                        the rest
======  ============  =====================================================  ==========

IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are classified as the IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, TypeAlias

from netstack.errors import PolicyError

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressLike: TypeAlias = str | IPAddress

#: Canonical group names, in classification order.
GROUPS: Final[tuple[str, ...]] = (
    "host",
    "metadata",
    "loopback",
    "private",
    "link_local",
    "multicast",
    "public",
)

#: Accepted spellings of each group name.
GROUP_ALIASES: Final[dict[str, str]] = {
    **{g: g for g in GROUPS},
    "link-local": "link_local",
}

METADATA_V4: Final = ipaddress.IPv4Address("169.254.169.254")

_V4: Final[dict[str, tuple[ipaddress.IPv4Network, ...]]] = {
    "loopback": (ipaddress.IPv4Network("127.0.0.0/8"),),
    "private": tuple(
        ipaddress.IPv4Network(n)
        for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
    ),
    "link_local": (ipaddress.IPv4Network("169.254.0.0/16"),),
    "multicast": (ipaddress.IPv4Network("224.0.0.0/4"),),
}
_V6: Final[dict[str, tuple[ipaddress.IPv6Network, ...]]] = {
    "loopback": (ipaddress.IPv6Network("::1/128"),),
    "private": (ipaddress.IPv6Network("fc00::/7"),),
    "link_local": (ipaddress.IPv6Network("fe80::/10"),),
    "multicast": (ipaddress.IPv6Network("ff00::/8"),),
}

#: The non-host, non-public groups as CIDR lists, in classification order.
#: ``metadata`` is the single address 169.254.169.254 (it precedes ``link_local``).
GROUP_NETWORKS: Final[dict[str, tuple[IPNetwork, ...]]] = {
    "metadata": (ipaddress.IPv4Network("169.254.169.254/32"),),
    **{g: (*_V4.get(g, ()), *_V6.get(g, ())) for g in ("loopback", "private", "link_local",
                                                       "multicast")},
}


def normalize_ip(value: AddressLike) -> IPAddress:
    """Parse ``value`` as an IP address, mapping IPv4-mapped IPv6 to IPv4.

    >>> normalize_ip("::ffff:10.0.0.1")
    IPv4Address('10.0.0.1')

    Raises :class:`~netstack.PolicyError` naming the value if it is not an IP address.
    """
    if isinstance(value, ipaddress.IPv4Address):
        return value
    if isinstance(value, ipaddress.IPv6Address):
        ip: IPAddress = value
    else:
        if not isinstance(value, str):
            raise PolicyError(f"expected an IP address, got {value!r} ({type(value).__name__})")
        try:
            ip = ipaddress.ip_address(value.strip())
        except ValueError:
            raise PolicyError(f"{value!r} is not an IPv4 or IPv6 address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize_gateway(gateway: Iterable[AddressLike] | AddressLike | None) -> tuple[IPAddress, ...]:
    """Normalise a gateway address (or several) into a tuple of IP addresses.

    >>> normalize_gateway("172.16.0.1")
    (IPv4Address('172.16.0.1'),)
    """
    if gateway is None:
        return ()
    if isinstance(gateway, str | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return (normalize_ip(gateway),)
    return tuple(normalize_ip(g) for g in gateway)


def canonical_group(name: str) -> str:
    """Return the canonical group name for ``name`` (``"link-local"`` -> ``"link_local"``).

    >>> canonical_group("Link-Local")
    'link_local'

    Raises :class:`~netstack.PolicyError` naming the value and the allowed groups.
    """
    if not isinstance(name, str):
        raise PolicyError(f"group name must be a string, got {name!r}")
    key = name.strip().lower()
    try:
        return GROUP_ALIASES[key]
    except KeyError:
        raise PolicyError(
            f"unknown destination group {name!r} (expected one of: "
            + ", ".join((*GROUPS[:4], "link_local (or link-local)", *GROUPS[5:]))
            + ")"
        ) from None


def classify_group(ip: AddressLike, gateway: Iterable[AddressLike] | AddressLike = ()) -> str | None:
    """Return the destination group of ``ip``, or ``None`` for an unspecified address.

    ``gateway`` is the sandbox's gateway address(es): those are the ``host`` group.

    >>> classify_group("172.16.0.1", gateway=["172.16.0.1"])
    'host'
    >>> classify_group("172.16.0.5", gateway=["172.16.0.1"])
    'private'
    >>> classify_group("169.254.169.254")
    'metadata'
    >>> classify_group("::ffff:8.8.8.8")
    'public'
    """
    addr = normalize_ip(ip)
    if addr.is_unspecified:
        return None
    if addr in normalize_gateway(gateway):
        return "host"
    if addr == METADATA_V4:
        return "metadata"
    table = _V4 if isinstance(addr, ipaddress.IPv4Address) else _V6
    for group in ("loopback", "private", "link_local", "multicast"):
        for net in table.get(group, ()):
            if addr in net:
                return group
    return "public"


def parse_network(value: str | IPNetwork) -> IPNetwork:
    """Parse a CIDR (or a bare IP, giving a /32 or /128), strictly.

    Host bits must be zero: ``"10.0.0.5/8"`` is refused rather than guessed at.
    IPv4-mapped IPv6 networks (``::ffff:0:0/96`` and longer) become IPv4 networks.

    >>> parse_network("10.0.0.0/8")
    IPv4Network('10.0.0.0/8')
    >>> parse_network("2001:db8::1")
    IPv6Network('2001:db8::1/128')
    """
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        net: IPNetwork = value
    else:
        if not isinstance(value, str):
            raise PolicyError(f"expected a CIDR string, got {value!r} ({type(value).__name__})")
        text = value.strip()
        if not text:
            raise PolicyError("empty CIDR")
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise PolicyError(f"{value!r} is not a valid CIDR ({exc})") from None
            raise PolicyError(
                f"CIDR {value!r} has host bits set: use {loose} for the network "
                f"or {text.split('/')[0]}/{loose.max_prefixlen} for the single address"
            ) from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net
