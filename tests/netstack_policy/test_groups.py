"""Group classification at every range boundary (reference microsandbox.md §1.2)."""

from __future__ import annotations

import pytest

from netstack import PolicyError, classify_group, normalize_ip, parse_network

GW = ("172.16.0.1", "fd42:6d73:62::1")

BOUNDARIES = [
    # unspecified: no group
    ("0.0.0.0", None),
    ("::", None),
    ("::ffff:0.0.0.0", None),
    # 0.0.0.0/8 beyond the unspecified address is public (not special-cased upstream)
    ("0.0.0.1", "public"),
    # host (gateway) beats private
    ("172.16.0.1", "host"),
    ("fd42:6d73:62::1", "host"),
    ("::ffff:172.16.0.1", "host"),
    # metadata beats link-local
    ("169.254.169.254", "metadata"),
    ("::ffff:169.254.169.254", "metadata"),
    ("169.254.169.253", "link_local"),
    ("169.254.169.255", "link_local"),
    ("169.254.0.0", "link_local"),
    ("169.254.255.255", "link_local"),
    ("169.253.255.255", "public"),
    ("169.255.0.0", "public"),
    ("fe80::", "link_local"),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "link_local"),
    ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "public"),
    ("fec0::", "public"),
    # loopback
    ("127.0.0.0", "loopback"),
    ("127.255.255.255", "loopback"),
    ("126.255.255.255", "public"),
    ("128.0.0.0", "public"),
    ("::1", "loopback"),
    ("::2", "public"),
    ("::ffff:127.0.0.1", "loopback"),
    # private v4
    ("10.0.0.0", "private"),
    ("10.255.255.255", "private"),
    ("9.255.255.255", "public"),
    ("11.0.0.0", "public"),
    ("172.16.0.0", "private"),
    ("172.31.255.255", "private"),
    ("172.15.255.255", "public"),
    ("172.32.0.0", "public"),
    ("192.168.0.0", "private"),
    ("192.168.255.255", "private"),
    ("192.167.255.255", "public"),
    ("192.169.0.0", "public"),
    ("100.64.0.0", "private"),
    ("100.127.255.255", "private"),
    ("100.63.255.255", "public"),
    ("100.128.0.0", "public"),
    # private v6 (ULA)
    ("fc00::", "private"),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "private"),
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "public"),
    ("fe00::", "public"),
    ("fd42:6d73:62::2", "private"),
    # multicast
    ("224.0.0.0", "multicast"),
    ("239.255.255.255", "multicast"),
    ("223.255.255.255", "public"),
    ("240.0.0.0", "public"),
    ("255.255.255.255", "public"),
    ("ff00::", "multicast"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "multicast"),
    ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "public"),
    # public incl. TEST-NETs and benchmark ranges
    ("192.0.2.1", "public"),
    ("198.51.100.1", "public"),
    ("203.0.113.1", "public"),
    ("198.18.0.1", "public"),
    ("2001:db8::1", "public"),
    ("8.8.8.8", "public"),
]


@pytest.mark.parametrize(("ip", "group"), BOUNDARIES)
def test_group_boundaries(ip: str, group: str | None) -> None:
    assert classify_group(ip, GW) == group


def test_gateway_other_sandbox_is_private() -> None:
    assert classify_group("172.16.0.1") == "private"
    assert classify_group("172.16.0.5", gateway="172.16.0.1") == "private"


def test_v4_mapped_normalized() -> None:
    assert str(normalize_ip("::ffff:192.0.2.1")) == "192.0.2.1"


@pytest.mark.parametrize("bad", ["", "1.2.3", "300.1.1.1", "example.com", "10.0.0.0/8", "::g"])
def test_bad_ip(bad: str) -> None:
    with pytest.raises(PolicyError, match="not an IPv4 or IPv6 address"):
        normalize_ip(bad)


def test_non_string_ip() -> None:
    with pytest.raises(PolicyError, match="expected an IP address"):
        normalize_ip(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("1.1.1.1", "1.1.1.1/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("::/0", "::/0"),
    ],
)
def test_parse_network(text: str, want: str) -> None:
    assert str(parse_network(text)) == want


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ("10.0.0.5/8", "host bits set"),
        ("10.0.0.0/33", "not a valid CIDR"),
        ("10.0.0.0/-1", "not a valid CIDR"),
        ("nonsense/8", "not a valid CIDR"),
        ("", "empty CIDR"),
    ],
)
def test_bad_cidr(bad: str, msg: str) -> None:
    with pytest.raises(PolicyError, match=msg):
        parse_network(bad)
