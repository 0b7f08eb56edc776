"""The ``Uplink`` protocol: what a :class:`~netstack.gateway.Gateway` needs from the network
its allowed traffic leaves through.

An uplink carries Ethernet frames between the gateway's C loop and the outside world,
addressed as the sandbox's :class:`~netstack.gateway.AddressPlan` says (the uplink side owns the
gateway's addresses and MAC). :class:`~netstack.gateway.TapUplink` (netns + TAP + NAT, root)
implements it; a rootless uplink (e.g. passt behind a socket pair) implements the same
members. The gateway never asks which kind it got.

**Core members** (:class:`Uplink`, every uplink):

* ``plan``: the :class:`~netstack.gateway.AddressPlan` the uplink was built for;
* ``mtu``: the largest IP packet (bytes after the Ethernet header) the uplink carries;
  larger guest packets are sent as GSO packets (TCP, with ``vnet_hdr``), fragmented
  (IPv4 without DF) or answered with ICMP "fragmentation needed" / ICMPv6 "packet too
  big" carrying this MTU;
* ``vnet_hdr``: every frame on ``tap_fd`` is preceded by a 10-byte virtio-net header
  and GSO packets are accepted (needed for a guest link MTU above ``mtu``);
* ``ipv6_egress``: the guest's IPv6 leaves (else AAAA answers are withheld);
* ``tap_fd``: a file descriptor with TAP semantics: one ``read()``/``write()`` is one
  frame (a ``SOCK_DGRAM``/``SOCK_SEQPACKET`` socket works); the gateway makes it
  non-blocking and keeps it open only as long as the uplink;
* ``set_mtu(mtu)``: called once when the guest link's MTU is below ``mtu`` (the
  uplink must then carry at most that);
* ``close()``: release everything (called by the gateway only with ``own_uplink``).

**Optional members** (looked up with ``getattr``; :class:`~netstack.gateway.PasstUplink` has them all):

* ``stream_framing`` (default False): ``tap_fd`` is a stream socket carrying frames
  with a 4-byte big-endian length prefix (passt's ``--fd``, QEMU's ``-netdev stream``),
  read and written as such by the C loop;
* ``forwarded_ports`` (default ``()``): :class:`~netstack.gateway.PublishedPort` mappings
  the uplink forwards to the guest itself (e.g. passt's listeners); the C loop
  ingress-checks their frames like the gateway's own published ports;
* ``steer_to_host`` (default False; with ``stream_framing``): guest TCP/UDP to the
  gateway's addresses reaches the host's loopback (passt's gateway mapping), so the
  C loop's steering NAT (``netstack/csrc/steer.c``) can send DNS over TCP and
  intercepted TLS to listener pools there (:func:`has_steering`);
* ``host_loopback`` (default False): with ``steer_to_host``, whether the guest itself
  may reach the host's loopback at the gateway address (the policy's ``host`` group
  decides first); without it the loop drops such traffic;
* ``peer_uid`` (default None): the uid owning the uplink's host sockets (passt's); a
  steered listener hands a flow only to a connection from that uid.

**Optional capability** (:class:`RedirectingUplink`: a local network stack on the
uplink side, such as the TAP uplink's namespace, whose sockets the guest reaches at the
gateway's addresses):

* ``socket(family, kind)``: a new socket in that network (DNS-over-TCP listeners, the
  TLS interception listener, connections to published guest ports);
* ``redirect_dns()``: guest TCP to port 53 at *any* address goes to the listener on the
  gateway's address port 53 (original destination from ``SO_ORIGINAL_DST``);
* ``redirect_tcp(ports, to_port, *, block_udp=True)``: guest TCP to ``ports`` goes to a
  listener on ``to_port`` (transparent TLS proxy), UDP to them is dropped if asked;
* ``clear_redirects()``: undo both (the gateway calls it when it closes).

Without the capability, ``published_ports`` and :meth:`~netstack.gateway.Gateway.intercept_tls`
are refused with a :class:`~netstack.errors.GatewayError`; a steering uplink serves DNS
over TCP and :meth:`~netstack.gateway.Gateway.tls_interception` through the NAT instead, any
other one gets a RST for DNS over TCP (DNS over UDP still goes to the forwarder).

>>> from netstack.gateway import Uplink, missing_uplink_members
>>> missing_uplink_members(object())
['plan', 'mtu', 'vnet_hdr', 'ipv6_egress', 'tap_fd', 'set_mtu', 'close']
"""

from __future__ import annotations

import inspect
import socket
import weakref
from collections.abc import Iterable
from typing import Protocol, Self, runtime_checkable

from netstack.errors import UplinkError
from netstack.gateway._addressing import AddressPlan

__all__ = ["RedirectingUplink", "Uplink", "can_intercept_tls", "check_intercept_ports",
           "has_redirects", "has_steering", "missing_uplink_members"]

_CORE = ("plan", "mtu", "vnet_hdr", "ipv6_egress", "tap_fd", "set_mtu", "close")
_CORE_METHODS = ("set_mtu", "close")
_REDIRECT_METHODS = ("socket", "redirect_dns", "redirect_tcp", "clear_redirects")


def _check_plan(plan: AddressPlan, ipv6_egress: bool | None) -> None:
    """The built-in uplinks' check of their ``plan`` and ``ipv6_egress`` arguments:
    UplinkError naming the bad value.

    >>> _check_plan(AddressPlan(4000), None)
    >>> _check_plan(AddressPlan(4000), True)
    Traceback (most recent call last):
    netstack.errors.UplinkError: ipv6_egress=True needs a plan with IPv6 (AddressPlan(..., ipv6=True))
    """
    if not isinstance(plan, AddressPlan):
        raise UplinkError(f"plan must be an AddressPlan, got {type(plan).__name__}")
    if ipv6_egress is not None and not isinstance(ipv6_egress, bool):
        raise UplinkError(f"ipv6_egress must be True, False or None, got {ipv6_egress!r}")
    if ipv6_egress and not plan.ipv6:
        raise UplinkError("ipv6_egress=True needs a plan with IPv6 (AddressPlan(..., "
                          "ipv6=True))")


def check_intercept_ports(ports: Iterable[int],
                          error: type[Exception] = UplinkError) -> tuple[int, ...]:
    """The ports of a TLS interception (``redirect_tcp``, ``Gateway.tls_interception``)
    as a tuple: 1..64 port numbers in 1..65535, never 53 (DNS); else ``error`` naming
    the bad value.

    >>> check_intercept_ports([443, 8443])
    (443, 8443)
    >>> check_intercept_ports([53])
    Traceback (most recent call last):
    netstack.errors.UplinkError: port 53 is DNS: it always goes to the DNS forwarder
    """
    if isinstance(ports, str | bytes):
        raise error(f"ports must be a list of port numbers, got {ports!r}")
    wanted = tuple(ports)
    if not wanted or len(wanted) > 64 or any(
            isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535
            for p in wanted):
        raise error(f"ports must be 1..64 port numbers in 1..65535, got {wanted!r}")
    if 53 in wanted:
        raise error("port 53 is DNS: it always goes to the DNS forwarder")
    return wanted


class _FinalizedUplink:
    """What the built-in uplinks share: everything they own is released by one
    ``weakref.finalize`` (``self._finalizer``, set in ``__init__``), run by :meth:`close`
    or when the uplink is collected; ``closed`` reports whether it ran; a ``with`` block
    closes the uplink on exit."""

    _finalizer: weakref.finalize[..., object]

    @property
    def closed(self) -> bool:
        """True after :meth:`close`.

        >>> up.close(); up.closed                         # doctest: +SKIP
        True
        """
        return not self._finalizer.alive

    def close(self) -> None:
        """Release everything the uplink owns (idempotent)."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@runtime_checkable
class Uplink(Protocol):
    """The core of an uplink (see the module docstring). A minimal one, for tests or a
    user-space network, over a datagram socket pair:

    >>> import socket
    >>> from netstack.gateway import AddressPlan
    >>> class PairUplink:
    ...     def __init__(self, plan: AddressPlan) -> None:
    ...         self.plan, self.mtu, self.vnet_hdr, self.ipv6_egress = plan, 1500, False, False
    ...         self.outside, inside = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ...         self._inside = inside
    ...         self.tap_fd = inside.fileno()
    ...     def set_mtu(self, mtu: int) -> None:
    ...         self.mtu = mtu
    ...     def close(self) -> None:
    ...         self._inside.close(); self.outside.close()
    >>> up = PairUplink(AddressPlan(5, mtu=1500))
    >>> isinstance(up, Uplink), missing_uplink_members(up)
    (True, [])
    >>> up.close()
    """

    @property
    def plan(self) -> AddressPlan:
        """The sandbox's address plan (the uplink side owns the gateway's addresses)."""
        ...

    @property
    def mtu(self) -> int:
        """The largest IP packet the uplink carries."""
        ...

    @property
    def vnet_hdr(self) -> bool:
        """Frames on ``tap_fd`` carry a 10-byte virtio-net header (GSO accepted)."""
        ...

    @property
    def ipv6_egress(self) -> bool:
        """Whether the guest's IPv6 traffic leaves."""
        ...

    @property
    def tap_fd(self) -> int:
        """The frame descriptor: one read/write = one frame."""
        ...

    def set_mtu(self, mtu: int) -> None:
        """Carry at most ``mtu``-byte packets (the guest link is smaller)."""
        ...

    def close(self) -> None:
        """Release everything (idempotent)."""
        ...


@runtime_checkable
class RedirectingUplink(Uplink, Protocol):
    """An uplink with a local network stack the gateway serves the guest from (DNS over
    TCP, TLS interception, published ports). :class:`~netstack.gateway.TapUplink` is one.

    >>> from netstack.gateway import TapUplink
    >>> has_redirects(TapUplink)
    True
    """

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
               ) -> socket.socket:
        """A new socket in the uplink's local network."""
        ...

    def redirect_dns(self) -> None:
        """Guest TCP/53 to any address -> the listener on gateway:53."""
        ...

    def redirect_tcp(self, ports: Iterable[int], to_port: int, *,
                     block_udp: bool = True) -> None:
        """Guest TCP to ``ports`` -> the listener on ``to_port``."""
        ...

    def clear_redirects(self) -> None:
        """Remove the redirects."""
        ...


def _has(obj: object, name: str, method: bool) -> bool:
    try:
        value = inspect.getattr_static(obj, name)
    except AttributeError:
        return False
    if method:
        return callable(value) or isinstance(value, staticmethod | classmethod)
    return True


def missing_uplink_members(obj: object) -> list[str]:
    """The core :class:`Uplink` members ``obj`` lacks (empty: it is an uplink).

    Looked up without calling properties (``isinstance(x, Uplink)`` on Python 3.11
    evaluates them, and a closed uplink's ``tap_fd`` raises).

    >>> missing_uplink_members(None)[:2]
    ['plan', 'mtu']
    """
    return [name for name in _CORE if not _has(obj, name, name in _CORE_METHODS)]


def has_redirects(obj: object) -> bool:
    """Whether ``obj`` (an uplink or its class) offers the :class:`RedirectingUplink`
    capability.

    >>> has_redirects(object())
    False
    """
    return all(_has(obj, name, True) for name in _REDIRECT_METHODS)


def has_steering(obj: object) -> bool:
    """Whether ``obj`` (an uplink or its class) lets the gateway steer flows to the host's
    loopback by NAT (``steer_to_host`` on a ``stream_framing`` uplink: passt).

    >>> from netstack.gateway import PasstUplink
    >>> has_steering(PasstUplink), has_steering(object())
    (True, False)
    """
    try:
        stream = inspect.getattr_static(obj, "stream_framing")
        steer = inspect.getattr_static(obj, "steer_to_host")
    except AttributeError:
        return False
    return stream is True and steer is True


def can_intercept_tls(obj: object) -> bool:
    """Whether a gateway on uplink ``obj`` can steer TLS to a proxy
    (:meth:`~netstack.gateway.Gateway.tls_interception`): a redirecting or a steering uplink.

    >>> from netstack.gateway import TapUplink, PasstUplink
    >>> can_intercept_tls(TapUplink), can_intercept_tls(PasstUplink), can_intercept_tls(1)
    (True, True, False)
    """
    return has_redirects(obj) or has_steering(obj)
