"""Exceptions raised by :mod:`netstack`; all derive from :class:`NetstackError`."""

from __future__ import annotations


class NetstackError(Exception):
    """Base class of every error raised by netstack.

    >>> from netstack import NetworkPolicy
    >>> try:
    ...     NetworkPolicy.from_dict({"default_egress": "maybe"})
    ... except NetstackError as e:
    ...     print(type(e).__name__)
    PolicyError
    """


class PolicyError(NetstackError, ValueError):
    """A network policy, rule, destination or flow was malformed.

    The message names the offending value and what is allowed, e.g.
    ``PolicyError("port range '90-80' is inverted (start 90 > end 80)")``.

    >>> from netstack import Rule
    >>> Rule.allow(destination="api.example.com", protocol="tcp", port="90-80")
    Traceback (most recent call last):
    netstack.errors.PolicyError: port range '90-80' is inverted (start 90 > end 80)
    """


class GatewayError(NetstackError):
    """A sandbox gateway component (address plan, uplink, DNS forwarder, pcap) failed.

    The message names the bad value or the failed operation, e.g.
    ``GatewayError("slot 70000 is out of range 0..65535")``.

    >>> from netstack.gateway import AddressPlan
    >>> try:
    ...     AddressPlan(70000)
    ... except GatewayError as e:
    ...     print(e)
    slot 70000 is out of range 0..65535
    """


class AddressPlanError(GatewayError, ValueError):
    """An address plan or slot was invalid, or no slot was free.

    >>> from netstack.gateway import AddressPlan
    >>> AddressPlan(0, mtu=100)
    Traceback (most recent call last):
    netstack.errors.AddressPlanError: mtu must be an int in 576..65520, got 100
    """


class UplinkError(GatewayError):
    """Creating or removing a sandbox uplink (netns, TAP, veth, nftables) failed.

    >>> raise UplinkError("ip netns add microvm-x failed: File exists")
    Traceback (most recent call last):
    netstack.errors.UplinkError: ip netns add microvm-x failed: File exists
    """


class DnsForwarderError(GatewayError, ValueError):
    """A DNS forwarder was misconfigured (e.g. an upstream that is not IP[:PORT]).

    >>> from netstack import NetworkPolicy
    >>> from netstack.gateway import DnsForwarder
    >>> DnsForwarder(NetworkPolicy.public_only().evaluate_dns, upstreams=["not-an-ip"])
    Traceback (most recent call last):
    netstack.errors.DnsForwarderError: upstream must be IP, IP:PORT or [IPv6]:PORT, got 'not-an-ip'
    """


class PcapError(GatewayError, ValueError):
    """A pcap writer was misconfigured or used after close.

    >>> from netstack.gateway import PcapWriter
    >>> PcapWriter("trace.pcap", format="erf")
    Traceback (most recent call last):
    netstack.errors.PcapError: format must be 'pcap' or 'pcapng', got 'erf'
    """


class FastPathError(NetstackError):
    """The C fast path refused a configuration or ran out of memory.

    >>> raise FastPathError("max_flows must be 16..16777216, got 3")
    Traceback (most recent call last):
    netstack.errors.FastPathError: max_flows must be 16..16777216, got 3
    """


class MalformedHello(NetstackError, ValueError):
    """Bytes that are not a (well-formed) TLS ClientHello.

    >>> from netstack import parse_client_hello
    >>> parse_client_hello(b"GET / HTTP/1.1\\r\\n")
    Traceback (most recent call last):
    netstack.errors.MalformedHello: not a TLS handshake record (first byte 0x47, expected 0x16)
    """


class MalformedFrame(NetstackError, ValueError):
    """An Ethernet frame the parser cannot read (truncated, bad lengths, oversize).

    >>> from netstack import parse_frame
    >>> parse_frame(b"\\x00" * 10)
    Traceback (most recent call last):
    netstack.errors.MalformedFrame: malformed frame (10 bytes): truncated or inconsistent headers
    """


class MalformedDNS(NetstackError, ValueError):
    """A DNS message the parser cannot read (truncated, bad names, pointer loops).

    >>> from netstack import parse_dns_response
    >>> parse_dns_response(b"\\x00\\x01")
    Traceback (most recent call last):
    netstack.errors.MalformedDNS: malformed DNS message (2 bytes)
    """
