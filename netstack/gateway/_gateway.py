"""``Gateway``: the running, policy-enforcing network of one sandbox.

It owns the compiled policy (:class:`~netstack.Classifier`), the DNS pin cache, the
DNS forwarder (in its own thread), and the C gateway loop (``netstack/csrc/gateway.c``),
which runs in its own pthread without the GIL:

* guest frames arrive on ``guest_socket`` / ``guest_fd`` with ``transport``
  ``"stream"`` (u32 big-endian length + frame: QEMU ``-netdev stream``, libkrun
  unixstream), ``"dgram"`` (one frame per datagram, an optional leading ``VFKT``
  handshake is consumed) or ``"tap"`` (a TAP fd);
* allowed frames go to the uplink (any object implementing :class:`~netstack.gateway.Uplink`;
  :class:`~netstack.gateway.TapUplink` is the root one), replies of allowed flows (and ICMP
  errors about them) come back; anything else arriving on the uplink is dropped, except
  connections to published ports;
* a guest packet larger than the uplink's MTU leaves as a GSO packet (TCP on a
  ``vnet_hdr`` uplink), as IPv4 fragments (IPv4 without DF), or is answered with ICMP
  "fragmentation needed" (IPv4 with DF) / ICMPv6 "packet too big" (IPv6) carrying the
  uplink's MTU, so the guest lowers its path MTU; nothing vanishes silently
  (:meth:`Gateway.stats`: ``frag_needed``, ``fragmented``, ``oversize_dropped``);
* ``published_ports`` (TCP and UDP, :class:`PublishedPort`): a host listener (127.0.0.1 by
  default) per mapping; each connection (UDP: each datagram) is checked with the ingress policy (the real
  peer address), then relayed through a connection the gateway opens to the guest from
  inside the uplink namespace (see :mod:`netstack.gateway._published`);
* denied TCP is answered with a RST, denied UDP with ICMP port unreachable, so guest
  programs fail fast; flows whose decision needs the TLS SNI have their data held
  (bounded) until the ClientHello is complete, then released or reset (both ways);
* UDP DNS queries (port 53, any address) are answered by the forwarder
  (``policy.evaluate_dns`` per query, NXDOMAIN on deny, rebind protection); its
  answers feed the pin cache the classifier uses for domain rules. DNS over TCP to any
  address is served by the same forwarder (the uplink namespace DNATs it to a listener
  on the gateway address; a resolver the guest picked is judged by the egress policy
  for ``resolver:53/tcp``, deny -> NXDOMAIN, allow -> forwarded there); on a steering
  uplink (passt: no namespace) the C loop's NAT sends it to a pool of the forwarder's
  listeners on the host's loopback instead (:mod:`netstack.gateway._steering`); with an
  uplink that can do neither it gets a RST;
* IPv4 and, with an IPv6 plan and an uplink with ``ipv6_egress``, IPv6 (NAT66); IPv6
  neighbour discovery between the guest and the gateway passes like ARP;
* :meth:`Gateway.tls_interception` steers allowed TCP on the TLS ports to a transparent
  proxy: listening in the uplink namespace (TAP, nftables redirect,
  :meth:`Gateway.intercept_tls`), or on a pool of loopback listeners fed by the C loop's
  steering NAT, each flow's original destination claimed through the proxy's lookup
  (passt; ``netstack/csrc/steer.c``);
* :meth:`Gateway.stats` / :meth:`Gateway.rule_counters` report counters; ``pcap``
  records every frame that crossed with its verdict (pcapng keeps the verdict).

Python only handles slow-path events, read from a bounded ring in its own thread;
the C loop never waits for Python (a full ring drops events and counts them).

>>> from netstack import NetworkPolicy
>>> from netstack.gateway import Gateway, TapUplink, AddressPlan
>>> import socket
>>> vmm, mine = socket.socketpair()                                   # doctest: +SKIP
>>> with TapUplink("doc-gw", AddressPlan(7)) as up, \\
...         Gateway(NetworkPolicy.public_only(), uplink=up, guest_socket=mine,
...                 dns_upstreams=["192.0.2.53"]) as gw:               # doctest: +SKIP
...     gw.guest_config()["ipv4"]["address"]
'172.16.0.30'
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from netstack._classifier import Classifier, RuleCounter
from netstack._fastpath import ffi, lib
from netstack._flow import Decision, Flow
from netstack._frameinfo import parse_frame
from netstack._ipbytes import ip16
from netstack._pincache import PinCache
from netstack._policy import NetworkPolicy
from netstack._verdict import Verdict
from netstack.errors import AddressPlanError, GatewayError, MalformedFrame, UplinkError
from netstack.gateway._addressing import AddressPlan
from netstack.gateway._dns_forwarder import DnsForwarder, ForwarderThread, pin_cache_callback
from netstack.gateway._pcap import PcapWriter
from netstack.gateway._published import PortPublisher, PublishedPort
from netstack.gateway._steering import (
    DNS_POOL,
    TLS_POOL,
    SteerClaim,
    TlsInterception,
    loopback_listeners,
)
from netstack.gateway._uplink import (
    RedirectingUplink,
    Uplink,
    check_intercept_ports,
    has_redirects,
    has_steering,
    missing_uplink_members,
)

log = logging.getLogger("netstack.gateway")

Transport = Literal["stream", "dgram", "tap"]
_MODES = {"stream": 0, "dgram": 1, "tap": 2}
_EV_DNS, _EV_DENIED, _EV_CAPTURE, _EV_GUEST_CLOSED, _EV_NOT_REPLY = 1, 2, 3, 4, 5
_IP_FREEBIND = 15
_STAT_FIELDS = ("guest_frames", "guest_bytes", "uplink_frames", "uplink_bytes", "to_uplink",
                "to_guest", "not_reply", "rst_sent", "icmp_sent", "dns_queries",
                "events_dropped", "injected", "held", "released", "hold_dropped",
                "guest_overflow", "write_errors", "loops", "too_big", "mss_raised",
                "frag_needed", "fragmented", "oversize_dropped")


_STEER_FIELDS = ("flows", "claimed", "live", "pool_busy", "table_full", "stray",
                 "gateway_dropped", "udp_dropped", "frag_dropped")


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


@dataclass
class _Resources:
    """Everything that must be released, reachable without the Gateway (finalizer)."""

    gw: Any = None
    publisher: PortPublisher | None = None
    thread: threading.Thread | None = None
    dns: ForwarderThread | None = None
    pcap: PcapWriter | None = None
    own_pcap: bool = False
    classifier: Classifier | None = None
    guest: socket.socket | None = None
    uplink: Uplink | None = None
    own_uplink: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    pid: int = field(default_factory=os.getpid)

    def close(self) -> None:
        with self.lock:
            if self.closed or os.getpid() != self.pid:
                return
            self.closed = True
            gw = self.gw
        if self.publisher is not None:
            self.publisher.close()
        if gw is not None:
            lib.ns_gw_stop(gw)          # joins the C thread, wakes the event reader
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)
        with self.lock:
            self.gw = None
        if gw is not None:
            lib.ns_gw_free(gw)
        if self.dns is not None:
            try:
                self.dns.close()
            except Exception as e:  # pragma: no cover - best effort at exit
                log.warning("closing the DNS forwarder failed: %s", e)
        if self.pcap is not None and self.own_pcap:
            self.pcap.close()
        if self.classifier is not None:
            self.classifier.close()
        if self.guest is not None:
            self.guest.close()
        if self.uplink is not None and self.own_uplink:
            self.uplink.close()
        elif self.uplink is not None and has_redirects(self.uplink):
            try:
                cast(RedirectingUplink, self.uplink).clear_redirects()
            except Exception as e:  # pragma: no cover - best effort at exit
                log.warning("removing the gateway's redirects from the uplink failed: %s", e)


#: send/receive buffer of the guest frame socket: room for dozens of 64 KiB frames
#: in flight (the kernel caps it at net.core.wmem_max / rmem_max)
GUEST_SOCKET_BUFFER = 4 << 20


def _size_socket_buffers(fd: int) -> None:
    """Enlarge the guest frame socket's buffers (best effort; not a socket: no-op)."""
    dup = os.dup(fd)
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return
    try:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, GUEST_SOCKET_BUFFER)
    except OSError as e:
        log.debug("guest socket buffers left as they are: %s", e)
    finally:
        sock.close()


class Gateway:
    """The policy-enforcing gateway of one sandbox (see the module docstring).

    ``uplink``: any object implementing :class:`~netstack.gateway.Uplink` (e.g. a
    :class:`~netstack.gateway.TapUplink`; closed with the gateway only if ``own_uplink``);
    ``published_ports`` and :meth:`intercept_tls` need its
    :class:`~netstack.gateway.RedirectingUplink` capability; DNS over TCP and
    :meth:`tls_interception` work with it or with a steering uplink (passt). Exactly one of ``guest_socket`` (a socket object; the gateway
    takes it over and closes it) or ``guest_fd`` (an fd the caller keeps owning) is the
    VMM side, framed as ``transport``. ``dns_upstreams``: resolvers for the forwarder
    (default: the host's resolv.conf). ``pcap``: a path or a :class:`PcapWriter`.
    ``rebind_protection``: see :class:`DnsForwarder` (turning it off is for tests
    whose "public" upstreams live in TEST-NET ranges, which count as reserved).
    ``published_ports``: ``"host:guest"``, ``(host, guest)`` or :class:`PublishedPort`
    (TCP), ``"host:guest/udp"`` or ``PublishedPort(h, g, "udp")`` (UDP, checked per
    datagram; see :attr:`published_udp`); host port 0 = any free one. ``mtu``: the guest
    link's MTU (default: the uplink plan's, :data:`~netstack.gateway.SANDBOX_GUEST_MTU` =
    65520 for a default :class:`~netstack.gateway.AddressPlan`); above the uplink's MTU (1500)
    it needs a ``vnet_hdr`` uplink (the :class:`~netstack.gateway.TapUplink` default): large
    guest TCP frames leave as GSO packets cut to the uplink's MSS, and the MSS option of
    SYNs towards the guest is raised to the guest link's when the peer accepts
    full-size segments (:meth:`guest_config` reports the MTU); other packets too big
    for the uplink are fragmented or answered with ICMP (see the module docstring).
    ``block_dns_bypass`` (default on): DNS over TLS/QUIC (853), mDNS, LLMNR and NetBIOS
    name service are refused whatever the policy says (RST / ICMP unreachable / drop), so
    every name lookup goes through the forwarder (see :class:`~netstack.Classifier`).

    >>> Gateway(NetworkPolicy.none(), uplink=None, guest_fd=0)   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    netstack.errors.GatewayError: uplink must implement netstack.gateway.Uplink (missing: plan, mtu, vnet_hdr, ipv6_egress, tap_fd, set_mtu, close), got NoneType
    """

    def __init__(self, policy: NetworkPolicy, *, uplink: Uplink,
                 guest_socket: socket.socket | None = None, guest_fd: int | None = None,
                 transport: Transport = "stream",
                 dns_upstreams: Sequence[str | tuple[str, int]] | None = None,
                 dns_timeout: float = 3.0, rebind_protection: bool = True,
                 pcap: str | os.PathLike[str] | PcapWriter | None = None,
                 published_ports: Iterable[PublishedPort | tuple[int, int] | str] = (),
                 own_uplink: bool = False,
                 max_flows: int = 16384, hello_timeout: float = 5.0,
                 event_slots: int = 4096, log_denied: bool = True,
                 mtu: int | None = None, block_dns_bypass: bool = True) -> None:
        if not isinstance(policy, NetworkPolicy):
            raise GatewayError(f"policy must be a NetworkPolicy, got {type(policy).__name__}")
        missing = missing_uplink_members(uplink)
        if missing:
            raise GatewayError(f"uplink must implement netstack.gateway.Uplink (missing: "
                               f"{', '.join(missing)}), got {type(uplink).__name__}")
        if transport not in _MODES:
            raise GatewayError(f"transport must be 'stream', 'dgram' or 'tap', got {transport!r}")
        if (guest_socket is None) == (guest_fd is None):
            raise GatewayError("give exactly one of guest_socket or guest_fd")
        if guest_socket is not None and not isinstance(guest_socket, socket.socket):
            raise GatewayError(f"guest_socket must be a socket, got {type(guest_socket).__name__}")
        if guest_fd is not None and (isinstance(guest_fd, bool) or not isinstance(guest_fd, int)
                                     or guest_fd < 0):
            raise GatewayError(f"guest_fd must be an open file descriptor, got {guest_fd!r}")
        if isinstance(published_ports, str | bytes):
            raise GatewayError(f"published_ports must be a list of mappings, got the string "
                               f"{published_ports!r}")
        self._mappings = [PublishedPort.parse(p) for p in published_ports]
        for proto in ("tcp", "udp"):
            ports = [m.guest_port for m in self._mappings if m.protocol == proto]
            if len(set(ports)) > 16:
                raise GatewayError(f"at most 16 distinct published guest {proto} ports")
            if len(set(ports)) != len(ports):
                raise GatewayError(f"guest {proto} port published twice: {sorted(ports)}")
        if isinstance(event_slots, bool) or not isinstance(event_slots, int) \
                or not 16 <= event_slots <= 65536:
            raise GatewayError(f"event_slots must be an int in 16..65536, got {event_slots!r}")
        plan = uplink.plan
        if not isinstance(plan, AddressPlan):
            raise GatewayError(f"uplink.plan must be an AddressPlan, got {type(plan).__name__}")
        if isinstance(uplink.mtu, bool) or not isinstance(uplink.mtu, int) \
                or not 576 <= uplink.mtu <= 65535:
            raise GatewayError(f"uplink.mtu must be an int in 576..65535, got {uplink.mtu!r}")
        if mtu is not None:
            try:
                plan = dataclasses.replace(plan, mtu=mtu)
            except AddressPlanError as e:
                raise GatewayError(f"mtu must be an int in 576..65520, got {mtu!r}") from e
        if plan.mtu > uplink.mtu and not uplink.vnet_hdr:
            raise GatewayError(f"a guest link MTU of {plan.mtu} (above the uplink's "
                               f"{uplink.mtu}) needs an uplink with vnet_hdr (e.g. "
                               f"TapUplink(vnet_hdr=True), the default): the loop cuts "
                               f"large TCP frames back to the uplink's MSS with GSO")
        forwarded = getattr(uplink, "forwarded_ports", ())
        if self._mappings and forwarded:
            raise GatewayError(f"{type(uplink).__name__} forwards published ports itself "
                               f"(forwarded_ports); give them to the uplink, not the gateway")
        if self._mappings and not has_redirects(uplink):
            raise GatewayError(f"published_ports need an uplink with socket() and redirects "
                               f"(netstack.gateway.RedirectingUplink), got "
                               f"{type(uplink).__name__}")
        if plan.mtu < uplink.mtu:
            uplink.set_mtu(plan.mtu)
        self.policy = policy
        self.uplink = uplink
        self.plan: AddressPlan = plan
        self.transport: Transport = transport
        self._res = _Resources(uplink=uplink, own_uplink=own_uplink, guest=guest_socket)
        self._finalizer = weakref.finalize(self, self._res.close)
        self._denied_seen: OrderedDict[tuple[object, ...], None] = OrderedDict()
        self.guest_closed = False
        try:
            self._start(policy, guest_socket, guest_fd, dns_upstreams, dns_timeout,
                        rebind_protection, pcap, max_flows, hello_timeout, event_slots,
                        log_denied, block_dns_bypass)
        except BaseException:
            self.close()
            raise

    def _start(self, policy: NetworkPolicy, guest_socket: socket.socket | None,
               guest_fd: int | None, dns_upstreams: Sequence[str | tuple[str, int]] | None,
               dns_timeout: float, rebind_protection: bool,
               pcap: str | os.PathLike[str] | PcapWriter | None, max_flows: int,
               hello_timeout: float, event_slots: int, log_denied: bool,
               block_dns_bypass: bool) -> None:
        res, plan = self._res, self.plan
        #: the uplink frames with a u32-BE length prefix on a stream (passt --fd)
        self._uplink_stream = bool(getattr(self.uplink, "stream_framing", False))
        #: published ports the uplink forwards itself (passt's listeners): ingress-checked
        self._forwarded = tuple(PublishedPort.parse(m) for m in
                                getattr(self.uplink, "forwarded_ports", ()))
        self.pins = PinCache()
        self.classifier = res.classifier = Classifier(
            policy, gateway=plan.gateway_addresses, pins=self.pins, max_flows=max_flows,
            hello_timeout=hello_timeout, intercept_ports=(), block_dns_bypass=block_dns_bypass)
        # an IPv6 plan without IPv6 egress: AAAA answers would only make guests try
        # addresses they cannot reach, so that family is answered empty
        inactive = () if plan.ipv6 and self.uplink.ipv6_egress else ("ipv6",)
        self.forwarder = DnsForwarder.for_plan(
            policy, plan, upstreams=dns_upstreams, timeout=dns_timeout,
            inactive_families=inactive,
            rebind_protection=rebind_protection, on_answer=pin_cache_callback(self.pins))
        res.dns = ForwarderThread(self.forwarder)
        if pcap is None or isinstance(pcap, PcapWriter):
            res.pcap = pcap
        else:
            res.pcap = PcapWriter(Path(pcap), format="pcapng")
            res.own_pcap = True
        cfg = ffi.new("ns_gw_config *")
        cfg.guest_fd = guest_socket.fileno() if guest_socket is not None else int(guest_fd or 0)
        if self.transport != "tap":
            _size_socket_buffers(cfg.guest_fd)
        cfg.guest_mode = _MODES[self.transport]
        cfg.uplink_fd = self.uplink.tap_fd
        ffi.memmove(cfg.guest_mac, _mac(plan.guest_mac), 6)
        ffi.memmove(cfg.gateway_mac, _mac(plan.gateway_mac), 6)
        cfg.event_slots = event_slots
        cfg.hold_frames = 1024
        cfg.hello_timeout = float(hello_timeout)
        cfg.capture = 1 if res.pcap is not None else 0
        cfg.log_denied = 1 if log_denied else 0
        cfg.uplink_vnet = 1 if self.uplink.vnet_hdr else 0
        cfg.uplink_stream = 1 if self._uplink_stream else 0
        if self._uplink_stream:
            _size_socket_buffers(cfg.uplink_fd)
        ffi.memmove(cfg.gateway_ip, ip16(plan.gateway_ipv4), 16)
        if plan.gateway_ipv6 is not None:
            ffi.memmove(cfg.gateway_ip6, ip16(plan.gateway_ipv6), 16)
        redirects = has_redirects(self.uplink)
        #: no local stack, but the steering NAT (passt): DNS over TCP and TLS interception
        #: go to listener pools on the host's loopback (netstack/csrc/steer.c)
        self._steering = not redirects and self._uplink_stream and has_steering(self.uplink)
        cfg.dns_tcp_reset = 0 if redirects or self._steering else 1
        cfg.guest_mtu = plan.mtu
        cfg.uplink_mtu = self.uplink.mtu
        ingress = [*self._mappings, *self._forwarded]
        guest_ports = sorted({m.guest_port for m in ingress if m.protocol == "tcp"})
        cfg.npublished = len(guest_ports)
        for i, port in enumerate(guest_ports):
            cfg.published[i] = port
        udp_ports = sorted({m.guest_port for m in ingress if m.protocol == "udp"})
        cfg.npublished_udp = len(udp_ports)
        for i, port in enumerate(udp_ports):
            cfg.published_udp[i] = port
        gw = lib.ns_gw_new(self.classifier.handle, cfg)
        if gw == ffi.NULL:
            raise GatewayError("could not create the gateway loop (out of memory or file "
                               "descriptors)")
        res.gw = gw
        if self._steering:
            self._serve_steered_dns(self._enable_steering(gw))
        self._event_fd = int(lib.ns_gw_event_fd(gw))
        res.thread = threading.Thread(target=self._events, name="netstack-gateway-events",
                                      daemon=True)
        res.thread.start()
        if lib.ns_gw_start(gw) != 0:
            raise GatewayError("could not start the gateway thread")
        if redirects:
            self._serve_dns_tcp()
        if self._mappings:
            res.publisher = PortPublisher(self._redirecting("published_ports").socket,
                                          str(plan.guest_ipv4),
                                          self._mappings, policy.evaluate)
        log.info("gateway for %s up: guest %s (%s), uplink %r, guest MTU %d, uplink MTU %d",
                 plan.guest_ipv4, cfg.guest_fd, self.transport, self.uplink, plan.mtu,
                 self.uplink.mtu)

    def _steer_v6(self) -> bool:
        return self.plan.gateway_ipv6 is not None and bool(self.uplink.ipv6_egress)

    def _enable_steering(self, gw: Any) -> list[socket.socket]:
        """Turn the C loop's steering NAT on, with the DNS-over-TCP listener pool (their
        sockets: served once the loop runs)."""
        socks = loopback_listeners(DNS_POOL, ipv6=self._steer_v6())
        try:
            scfg = ffi.new("ns_gw_steer_config *")
            ffi.memmove(scfg.gateway_ip, ip16(self.plan.gateway_ipv4), 16)
            if self._steer_v6():
                assert self.plan.gateway_ipv6 is not None
                ffi.memmove(scfg.gateway_ip6, ip16(self.plan.gateway_ipv6), 16)
            scfg.allow_gateway = 1 if getattr(self.uplink, "host_loopback", False) else 0
            scfg.dns = 1
            ports = sorted({int(s.getsockname()[1]) for s in socks})
            scfg.ndns_pool = len(ports)
            for i, port in enumerate(ports):
                scfg.dns_pool[i] = port
            if lib.ns_gw_steer_enable(gw, scfg) != 0:
                raise GatewayError("could not enable the gateway's steering NAT (out of "
                                   "memory or randomness)")
        except BaseException:
            for s in socks:
                s.close()
            raise
        return socks

    def _serve_steered_dns(self, socks: list[socket.socket]) -> None:
        """DNS over TCP on the steering pool's listeners, served by the forwarder: each
        connection's original destination is claimed from the C loop (:class:`SteerClaim`),
        and a connection with none is closed."""
        assert self._res.dns is not None
        lookup = self._steer_claim()
        served = 0
        try:
            for s in socks:
                self._res.dns.serve_tcp_socket(s, lookup=lookup)
                served += 1
        except BaseException:
            for s in socks[served:]:   # the forwarder closes those it serves
                s.close()
            raise

    def _steer_claim(self) -> SteerClaim:
        res = self._res

        def claim(port: int) -> tuple[str, int] | None:
            dst16 = ffi.new("uint8_t[16]")
            dport = ffi.new("uint16_t *")
            with res.lock:
                if res.gw is None:
                    return None
                rc = lib.ns_gw_steer_claim(res.gw, port, dst16, dport)
            if rc != 0:
                return None
            ip = ipaddress.IPv6Address(bytes(ffi.buffer(dst16, 16)))
            return str(ip.ipv4_mapped or ip), int(dport[0])

        uid = getattr(self.uplink, "peer_uid", None)
        return SteerClaim(claim, uid if isinstance(uid, int) else None)

    def _redirecting(self, what: str) -> RedirectingUplink:
        if not has_redirects(self.uplink):
            raise GatewayError(f"{what} needs an uplink with socket() and redirects "
                               f"(netstack.gateway.RedirectingUplink), got "
                               f"{type(self.uplink).__name__}")
        return cast(RedirectingUplink, self.uplink)

    def _serve_dns_tcp(self) -> None:
        """DNS over TCP: listeners on gateway:53 (IPv4, and IPv6 with an IPv6 plan) inside
        the uplink namespace, whose TAP owns the gateway addresses. The C loop passes
        guest TCP/53 to any address to the uplink, the namespace DNATs it here, and the
        forwarder reads the address the guest asked from ``SO_ORIGINAL_DST``."""
        addrs = [(socket.AF_INET, str(self.plan.gateway_ipv4))]
        if self.plan.gateway_ipv6 is not None:
            addrs.append((socket.AF_INET6, str(self.plan.gateway_ipv6)))
        uplink = self._redirecting("DNS over TCP")
        for family, addr in addrs:
            sock = uplink.socket(family)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    # the gateway's ULA address may still be tentative (DAD)
                    sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
                sock.bind((addr, 53))
                sock.listen(64)
                sock.setblocking(False)
                assert self._res.dns is not None
                self._res.dns.serve_tcp_socket(sock, original_dst=True)
            except BaseException:
                sock.close()
                raise
        uplink.redirect_dns()

    def intercept_tls(self, ports: Iterable[int] = (443,), *,
                      block_quic: bool = True) -> socket.socket:
        """Steer the guest's TCP to ``ports`` (any destination) to a transparent proxy.

        Returns a listening TCP socket (dual-stack, non-blocking) in the uplink namespace;
        the caller serves it with a transparent TLS proxy (e.g. ``tls_proxy.TlsProxy``),
        which reads each connection's real destination with ``SO_ORIGINAL_DST``. The
        gateway still enforces the policy first (SNI decisions included): only flows it
        allows reach the proxy. ``block_quic`` drops the guest's UDP to the same ports so
        clients fall back to TCP. The caller closes the socket; the redirect lives as
        long as the uplink (call again to change the ports).

        >>> srv = gw.intercept_tls([443])                          # doctest: +SKIP
        >>> await proxy.listen_transparent(sock=srv)               # doctest: +SKIP
        """
        if self.closed:
            raise GatewayError("this Gateway is closed")
        if self._steering:
            raise GatewayError(f"{type(self.uplink).__name__} steers TLS to a pool of "
                               f"listeners: use Gateway.tls_interception()")
        uplink = self._redirecting("intercept_tls")
        sock = uplink.socket(socket.AF_INET6)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
            sock.listen(1024)
            sock.setblocking(False)
            uplink.redirect_tcp(ports, int(sock.getsockname()[1]), block_udp=block_quic)
        except BaseException as e:
            sock.close()
            if isinstance(e, Exception) and not isinstance(e, GatewayError | UplinkError):
                raise GatewayError(f"could not set up TLS interception: {e}") from e
            raise
        return sock

    def tls_interception(self, ports: Iterable[int] = (443,), *,
                         block_quic: bool = True) -> TlsInterception:
        """Steer the guest's TCP to ``ports`` (any destination) to a transparent proxy,
        with any uplink that can: the listening sockets to serve, and the ``lookup``
        that tells each accepted connection's original destination.

        With a :class:`~netstack.gateway.RedirectingUplink` (TAP): one socket in the
        uplink namespace (:meth:`intercept_tls`), ``lookup`` None (``SO_ORIGINAL_DST``).
        With a steering uplink (passt): a pool of listeners on the host's loopback, to
        which the C loop's NAT sends each new flow, and ``lookup(peer, local)`` claims
        the flow's original destination (see :mod:`netstack.gateway._steering`). Serve
        every socket with the same lookup; the policy is enforced first either way
        (SNI decisions included). ``block_quic`` drops the guest's UDP to the same ports.

        >>> ti = gw.tls_interception([443])                        # doctest: +SKIP
        >>> for s in ti.sockets:                                   # doctest: +SKIP
        ...     await proxy.listen_transparent(sock=s, lookup=ti.lookup)
        """
        wanted = check_intercept_ports(ports, GatewayError)
        if self.closed:
            raise GatewayError("this Gateway is closed")
        if not self._steering:
            return TlsInterception((self.intercept_tls(wanted, block_quic=block_quic),), None)
        socks = loopback_listeners(TLS_POOL, ipv6=self._steer_v6())
        try:
            pool = sorted({int(s.getsockname()[1]) for s in socks})
            cports = ffi.new("uint16_t[]", list(wanted))
            cpool = ffi.new("uint16_t[]", pool)
            with self._res.lock:
                if self._res.gw is None:
                    raise GatewayError("this Gateway is closed")
                rc = lib.ns_gw_steer_tls(self._res.gw, cports, len(wanted), cpool, len(pool),
                                         1 if block_quic else 0)
            if rc != 0:
                raise GatewayError("could not configure the steering NAT for TLS")
        except BaseException:
            for s in socks:
                s.close()
            raise
        log.info("gateway for %s: guest TCP to ports %s steered to listeners %s on the "
                 "host's loopback%s", self.plan.guest_ipv4, sorted(set(wanted)), pool,
                 " (UDP to them dropped)" if block_quic else "")
        return TlsInterception(tuple(socks), self._steer_claim())

    # -- slow path ---------------------------------------------------------------------
    def _events(self) -> None:
        ev = ffi.new("ns_gw_event *")
        data = ffi.new("uint8_t[]", 2048)
        res = self._res
        while True:
            try:
                os.read(self._event_fd, 8)
            except OSError:
                return
            while True:
                with res.lock:
                    gw = res.gw
                    if gw is None or res.closed:
                        return
                    got = lib.ns_gw_next_event(gw, ev, data, 2048)
                if not got:
                    break
                try:
                    self._event(int(ev.kind), int(ev.verdict), int(ev.rule), float(ev.ts),
                                bytes(ffi.buffer(data, ev.len)), int(ev.direction))
                except Exception:  # never let one bad event stop the slow path
                    log.exception("gateway event handler failed")

    def _event(self, kind: int, verdict: int, rule: int, ts: float, frame: bytes,
               direction: int) -> None:
        if kind == _EV_DNS:
            self._dns_query(frame)
        elif kind == _EV_CAPTURE:
            pcap = self._res.pcap
            if pcap is not None:
                pcap.write(frame, verdict=Verdict(verdict).label,
                           direction="in" if direction == 1 else "out")
        elif kind == _EV_DENIED:
            self._log_denied(frame, verdict, rule)
        elif kind == _EV_NOT_REPLY:
            pcap = self._res.pcap
            if pcap is not None:
                pcap.write(frame, verdict="deny (not a reply)", direction="out")
        elif kind == _EV_GUEST_CLOSED:
            self.guest_closed = True
            log.info("gateway: the guest side hung up%s",
                     " (invalid stream framing)" if verdict == 7 else "")

    def _log_denied(self, frame: bytes, verdict: int, rule: int) -> None:
        try:
            info = parse_frame(frame)
        except MalformedFrame:
            log.info("gateway: dropped a malformed frame from the guest (%d bytes)", len(frame))
            return
        key = (info.protocol, info.src, info.dst, info.sport, info.dport)
        if key in self._denied_seen:
            return
        self._denied_seen[key] = None
        if len(self._denied_seen) > 4096:
            self._denied_seen.popitem(last=False)
        why = f"rule {rule}" if rule >= 0 else "default policy"
        log.info("gateway: denied %s %s:%s -> %s:%s (%s; %s)", info.protocol, info.src,
                 info.sport, info.dst, info.dport, Verdict(verdict).label, why)

    def _dns_query(self, frame: bytes) -> None:
        try:
            info = parse_frame(frame)
        except MalformedFrame:
            return
        if info.src is None or info.dst is None or info.sport is None or info.dport is None:
            return
        wire = frame[info.payload_offset:info.payload_offset + info.payload_length]
        dns = self._res.dns
        if dns is None:
            return
        src, dst, sport, dport = info.src, info.dst, info.sport, info.dport
        fut = dns.submit(wire, "udp", (str(dst), dport))

        def done(f: Any) -> None:
            if f.cancelled():   # the gateway is closing
                return
            try:
                answer = f.result()
            except Exception as e:
                log.warning("gateway: DNS query from %s failed: %s", src, e)
                return
            if answer:
                self._inject_udp(dst, dport, src, sport, answer)

        fut.add_done_callback(done)

    def _inject_udp(self, src: ipaddress.IPv4Address | ipaddress.IPv6Address, sport: int,
                    dst: ipaddress.IPv4Address | ipaddress.IPv6Address, dport: int,
                    payload: bytes) -> None:
        with self._res.lock:
            gw = self._res.gw
            if gw is None:
                return
            rc = lib.ns_gw_inject_udp(gw, ip16(src), sport, ip16(dst), dport, payload,
                                      len(payload))
        if rc != 0:
            log.warning("gateway: could not inject a %d-byte DNS answer (rc %d)", len(payload),
                        rc)

    # -- public API --------------------------------------------------------------------
    def inject(self, frame: bytes) -> None:
        """Queue one Ethernet frame for the guest (at most 2048 bytes).

        >>> gw.inject(frame)                                     # doctest: +SKIP
        """
        if not isinstance(frame, bytes | bytearray) or not 14 <= len(frame) <= 2048:
            raise GatewayError(f"inject needs an Ethernet frame of 14..2048 bytes, got "
                               f"{type(frame).__name__} of {len(frame)} bytes"
                               if isinstance(frame, bytes | bytearray) else
                               f"inject needs bytes, got {type(frame).__name__}")
        with self._res.lock:
            if self._res.gw is None:
                raise GatewayError("this Gateway is closed")
            rc = lib.ns_gw_inject(self._res.gw, bytes(frame), len(frame))
        if rc != 0:
            raise GatewayError("the inject queue is full; retry later")

    def reload(self, policy: NetworkPolicy) -> None:
        """Swap in ``policy`` atomically while the gateway runs (e.g. on SIGHUP).

        The classifier's tables are recompiled and swapped in one step
        (:meth:`~netstack.Classifier.recompile`); the DNS forwarder's per-query decision,
        rebind exemptions and resolver check and the published ports' ingress check use
        the new policy from their next query / connection. Flows already allowed keep
        their recorded verdict until they expire.

        >>> gw.reload(NetworkPolicy.none())                     # doctest: +SKIP
        >>> gw.policy.default_egress                             # doctest: +SKIP
        'deny'
        """
        if not isinstance(policy, NetworkPolicy):
            raise GatewayError(f"policy must be a NetworkPolicy, got {type(policy).__name__}")
        if self.closed:
            raise GatewayError("this Gateway is closed")
        self.classifier.recompile(policy)
        fwd = self.forwarder
        gateway_ips = fwd.gateway

        def rebind_exempt(ip: str) -> bool:
            return bool(policy.rebind_exempt(ip, gateway_ips))

        def egress_decider(ip: str, protocol: str, port: int) -> Decision:
            return policy.evaluate(Flow("egress", protocol, ip, port))

        fwd.policy_decider = policy.evaluate_dns
        fwd.rebind_exempt = rebind_exempt
        fwd.egress_decider = egress_decider
        if self._res.publisher is not None:
            self._res.publisher.check = policy.evaluate
        self.policy = policy
        log.info("gateway for %s: policy reloaded (%d rules)", self.plan.guest_ipv4,
                 len(policy.rules))

    @property
    def published(self) -> dict[int, int]:
        """Published ports: guest port -> the host port actually bound.

        >>> gw.published                                           # doctest: +SKIP
        {80: 41234}
        """
        pub = self._res.publisher
        return {**{m.guest_port: m.host_port for m in self._forwarded if m.protocol == "tcp"},
                **(pub.ports if pub is not None else {})}

    @property
    def published_udp(self) -> dict[int, int]:
        """Published UDP ports: guest port -> the host port actually bound.

        >>> gw.published_udp                                       # doctest: +SKIP
        {53: 41235}
        """
        pub = self._res.publisher
        return {**{m.guest_port: m.host_port for m in self._forwarded if m.protocol == "udp"},
                **(pub.udp_ports if pub is not None else {})}

    def guest_config(self) -> dict[str, Any]:
        """What the guest needs to configure eth0, resolv.conf and the host alias.

        >>> gw.guest_config()["ipv4"]["gateway"]                   # doctest: +SKIP
        '172.16.0.29'
        """
        return self.plan.guest_config()

    def stats(self) -> dict[str, Any]:
        """Counters of the C loop, verdicts, the flow table, DNS, and per-rule hits.

        >>> gw.stats()["verdicts"]["allow"]                        # doctest: +SKIP
        12
        """
        out = ffi.new("ns_gw_stats *")
        steer = ffi.new("ns_gw_steer_stats *")
        with self._res.lock:
            if self._res.gw is None:
                raise GatewayError("this Gateway is closed")
            lib.ns_gw_stats_get(self._res.gw, out)
            pending = int(lib.ns_gw_pending(self._res.gw))
            lib.ns_gw_steer_stats_get(self._res.gw, steer)
        stats: dict[str, Any] = {name: int(getattr(out, name)) for name in _STAT_FIELDS}
        stats["verdicts"] = {Verdict(i).label: int(out.verdicts[i]) for i in range(8)}
        stats["pending_flows"] = pending
        cs = self.classifier.stats()
        stats["flows"] = {"live": cs.live_flows, "created": cs.flows_created,
                          "evicted": cs.flows_evicted, "expired": cs.flows_expired,
                          "malformed": cs.malformed, "hello_denied": cs.hello_denied}
        stats["dns"] = dict(self.forwarder.stats)
        stats["rule_hits"] = [c.hits for c in self.rule_counters()]
        pub = self._res.publisher
        stats["published"] = dict(pub.stats) if pub is not None else {}
        stats["steering"] = {name: int(getattr(steer, name)) for name in _STEER_FIELDS}
        return stats

    def rule_counters(self) -> list[RuleCounter]:
        """Per-rule counters (hits, packets, bytes), then the egress and ingress defaults.

        >>> gw.rule_counters()[0].hits                             # doctest: +SKIP
        1
        """
        return self.classifier.rule_counters()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran.

        >>> gw.close(); gw.closed                                  # doctest: +SKIP
        True
        """
        return self._res.closed

    def close(self) -> None:
        """Stop the loop and release everything (idempotent; also runs at exit).

        >>> gw.close(); gw.close()                                 # doctest: +SKIP
        """
        self._finalizer()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
