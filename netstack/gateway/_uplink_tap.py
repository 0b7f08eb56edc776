"""TAP uplink: a network namespace per sandbox, NATed to the host's address.

Topology for sandbox token ``T`` on slot ``S`` (needs root)::

    gateway process                netns microvm-T                    host namespace
    tap_fd  ==frames==>  mvtT (gateway /30 addr, gateway MAC)
                           |  ip_forward=1, nft "inet microvm_T":
                           |  masquerade out of mvpT
                         mvpT 10.212.x.(2S+1)/31  <==veth==>  mvhT 10.212.x.(2S)/31
                                                              nft "inet microvm_T": masquerade
                                                              out of any other link, forward
                                                              accept, input from mvhT dropped

Frames the gateway writes to :attr:`TapUplink.tap_fd` enter the namespace as if the
guest sent them; the namespace routes them to the host over the veth, and the host
forwards them with its own address (so guest addresses never appear in the host's
routing table and cannot collide with host networks). Replies come back the same way
and are read from ``tap_fd``.

The ``host`` group (``host_loopback=True``): traffic from the guest to the gateway
address is DNATed in the namespace to the host end of the veth, and there DNATed to
``127.0.0.1`` (same port). Routing a packet from a non-loopback interface to
127.0.0.1 requires ``route_localnet=1`` on that interface; we set it **only** on the
sandbox's own host veth ``mvhT`` (never ``all``), and only when ``host_loopback`` is
asked for, so other interfaces keep the kernel's martian-address protection. Without
it, every packet from ``mvhT`` to the host itself (other than replies) is dropped.

Host-wide effect: ``net.ipv4.ip_forward`` is set to 1 if it was 0 and never reset
(other uplinks may depend on it). A host firewall that drops forwarded traffic in
another table (e.g. Docker's ``FORWARD DROP``) also drops ours; allow ``mvh*`` there.
IPv6 (a plan with ``ipv6=True``): the TAP owns the gateway's ULA address and, with
``ipv6_egress`` (the default when the host has IPv6), the namespace routes the guest's
IPv6 over a /127 ULA transit link (``fd42:6d73:74::/64``) and masquerades it, and the
host masquerades it again out of its own links (NAT66, like IPv4). This turns on
``net.ipv6.conf.all.forwarding`` host-wide (never reset); interfaces that had
``accept_ra=1`` get ``accept_ra=2`` first so they keep accepting router advertisements.
The ``host`` group is IPv4-only (IPv6 has no ``route_localnet``: ``::1`` cannot be a
DNAT target from another interface).

:meth:`TapUplink.redirect_dns` DNATs guest DNS over TCP to any address to the gateway
address, where the forwarder listens (:func:`netns_ruleset`); :meth:`TapUplink.redirect_tcp` steers TCP
ports (e.g. 443) to a transparent proxy listening in the namespace
(:meth:`TapUplink.socket`).

For the gateway loop: ``tap_fd`` is a non-persistent TAP (IFF_TAP | IFF_NO_PI, plus
IFF_VNET_HDR by default: a 10-byte virtio-net header before each frame; MTU = the
plan's, at most :data:`UPLINK_MTU`): one read = one Ethernet frame; the TAP itself
vanishes when the fd is closed. Its MAC is the plan's gateway MAC and it owns the
gateway IPv4 address, so guest frames can be written unchanged (dst MAC = gateway
MAC); the namespace ARPs for the guest address through ``tap_fd`` (relay the request
to the guest or answer it with the guest MAC). Proven end to end with an allow-all
Python relay in ``tests/netstack_gateway/test_topology.py``.

All names are derived from the sandbox name (IFNAMSIZ-safe, common prefixes ``mv``
for links and ``microvm`` for the namespace and nft tables), recorded in
``$MICROVM_HOME/net/uplinks/T.json`` before anything is created, and removed by
:meth:`TapUplink.close`, at interpreter exit, when the object is collected, or by
:func:`netstack.gateway.cleanup_stale` after a crash.

>>> uplink_names("web-1")["tap"]
'mvtweb1c4719a'
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import socket
import struct
import subprocess
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from netstack.errors import UplinkError
from netstack.gateway._addressing import AddressPlan, microvm_home
from netstack.gateway._netns import socket_in, write_sysctls
from netstack.gateway._state import (
    UplinkRecord,
    process_identity,
    remove_objects,
    state_dir,
    write_record,
)
from netstack.gateway._uplink import _check_plan, _FinalizedUplink, check_intercept_ports

log = logging.getLogger("netstack.gateway")

#: Pool the per-slot /31 transit links (namespace <-> host) are carved from.
TRANSIT_POOL: Final = ipaddress.IPv4Network("10.212.0.0/15")
#: Pool the per-slot IPv6 /127 transit links are carved from (with IPv6 egress).
TRANSIT6_POOL: Final = ipaddress.IPv6Network("fd42:6d73:74::/64")

_TUNSETIFF: Final = 0x400454CA
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000
_IFF_VNET_HDR: Final = 0x4000
_NODAD: Final = 0x02  # IFA_F_NODAD: transit addresses are usable at once
#: Bytes of the virtio-net header before each frame on a ``vnet_hdr=True`` TAP.
VNET_HDR_LEN: Final = 10
_SANDBOX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _token(sandbox: str) -> str:
    if not isinstance(sandbox, str) or not _SANDBOX_NAME.match(sandbox):
        raise UplinkError(f"sandbox name must be 1..63 characters of letters, digits, '_', "
                          f"'.', '-' starting with a letter or digit, got {sandbox!r}")
    safe = re.sub(r"[^a-z0-9]", "", sandbox.lower())[:6]
    return safe + hashlib.sha256(sandbox.encode()).hexdigest()[:6]


def uplink_names(sandbox: str) -> dict[str, str]:
    """The kernel object names an uplink for ``sandbox`` uses (all <= 15 characters).

    >>> sorted(uplink_names("web-1"))
    ['host_veth', 'netns', 'nft_table', 'ns_veth', 'tap', 'token']
    >>> all(len(v) <= 15 for k, v in uplink_names("a" * 63).items() if k in ('tap', 'ns_veth', 'host_veth'))
    True
    """
    t = _token(sandbox)
    return {"token": t, "netns": f"microvm-{t}", "tap": f"mvt{t}", "ns_veth": f"mvp{t}",
            "host_veth": f"mvh{t}", "nft_table": f"microvm_{t}"}


def transit_addresses(slot: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """``(host end, namespace end)`` of the slot's /31 transit link.

    >>> [str(a) for a in transit_addresses(1)]
    ['10.212.0.2', '10.212.0.3']
    """
    host = TRANSIT_POOL.network_address + 2 * slot
    return host, host + 1


def transit_addresses6(slot: int) -> tuple[ipaddress.IPv6Address, ipaddress.IPv6Address]:
    """``(host end, namespace end)`` of the slot's IPv6 /127 transit link (IPv6 egress).

    >>> [str(a) for a in transit_addresses6(1)]
    ['fd42:6d73:74::2', 'fd42:6d73:74::3']
    """
    host = TRANSIT6_POOL.network_address + 2 * slot
    return host, host + 1


def _run(argv: list[str], stdin: str | None = None) -> None:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30,
                       check=False)
    if r.returncode != 0:
        raise UplinkError(f"{' '.join(argv)} failed (exit {r.returncode}): "
                          f"{(r.stderr or r.stdout).strip()}")


def netns_ruleset(names: dict[str, str], plan: AddressPlan, host_loopback: bool,
                  *, dns_redirect: bool = False,
                  intercept: tuple[tuple[int, ...], int, bool] | None = None) -> str:
    """The nftables ruleset loaded inside the sandbox namespace (family ``inet``).

    ``dns_redirect``: guest DNS over TCP to *any* address is DNATed to the forwarder's
    listener on the gateway address (IPv4 and, with an IPv6 plan, IPv6), which judges
    every query and, for a resolver the guest picked, the egress policy towards it
    (without it, only TCP/53 to the gateway address is served there). ``intercept``:
    ``(ports, local port, block UDP)``: guest TCP to those ports is redirected to a
    listener on that port in this namespace (the TLS proxy; it reads the original
    destination with ``SO_ORIGINAL_DST``), and UDP to them (QUIC) is dropped if asked.

    >>> print(netns_ruleset(uplink_names("d"), AddressPlan(0), False).splitlines()[0])
    table inet microvm_d18ac3e
    """
    host_end, _ = transit_addresses(plan.slot)
    t, tap, nsv = names["nft_table"], names["tap"], names["ns_veth"]
    gw4, gw6 = plan.gateway_ipv4, plan.gateway_ipv6
    pre = []
    if dns_redirect:
        pre.append(f'iifname "{tap}" meta nfproto ipv4 tcp dport 53 dnat ip to {gw4}:53')
    else:  # DNS over TCP to the gateway is never DNATed to the host
        pre.append(f'iifname "{tap}" ip daddr {gw4} tcp dport 53 accept')
    local = [f'iifname "{tap}" ip daddr {gw4} tcp dport 53 accept']
    if gw6 is not None:
        if dns_redirect:
            pre.append(f'iifname "{tap}" meta nfproto ipv6 tcp dport 53 '
                       f'dnat ip6 to [{gw6}]:53')
        local.append(f'iifname "{tap}" ip6 daddr {gw6} tcp dport 53 accept')
    fwd = ""
    if intercept is not None:
        ports, listen, block_udp = intercept
        port_set = ", ".join(str(p) for p in sorted(set(ports)))
        pre.append(f'iifname "{tap}" tcp dport {{ {port_set} }} redirect to :{listen}')
        local.append(f'iifname "{tap}" tcp dport {listen} accept')
        if block_udp:
            fwd = (f"  chain forward {{ type filter hook forward priority filter; "
                   f"policy accept;\n"
                   f'    iifname "{tap}" udp dport {{ {port_set} }} drop\n'
                   f"  }}\n")
    if host_loopback:
        # the host group: the gateway address reaches the host's loopback services
        pre.append(f'iifname "{tap}" ip daddr {gw4} dnat ip to {host_end}')
    lines = "".join(f"    {r}\n" for r in pre)
    accept = "".join(f"    {r}\n" for r in local)
    return (
        f"table inet {t}\n"
        f"delete table inet {t}\n"
        f"table inet {t} {{\n"
        f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n"
        f"{lines}  }}\n"
        f"  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{nsv}" masquerade\n'
        f"  }}\n"
        f"  chain input {{ type filter hook input priority filter; policy accept;\n"
        f'    iifname "{tap}" ct state established,related accept\n'
        f'    iifname "{tap}" meta l4proto {{ icmp, ipv6-icmp }} accept\n'
        f"{accept}"
        f'    iifname "{tap}" drop\n'
        f"  }}\n"
        f"{fwd}"
        f"}}\n"
    )


def host_ruleset(names: dict[str, str], plan: AddressPlan, host_loopback: bool,
                 ipv6_egress: bool = False) -> str:
    """The nftables ruleset loaded in the host namespace (family ``inet``).

    >>> "dnat ip to 127.0.0.1" in host_ruleset(uplink_names("d"), AddressPlan(0), True)
    True
    """
    host_end, ns_end = transit_addresses(plan.slot)
    t, hv = names["nft_table"], names["host_veth"]
    dnat = (f'    iifname "{hv}" ip daddr {host_end} dnat ip to 127.0.0.1\n'
            if host_loopback else "")
    local = f'    iifname "{hv}" ip daddr 127.0.0.1 accept\n' if host_loopback else ""
    nat6 = ""
    if ipv6_egress:
        _, ns_end6 = transit_addresses6(plan.slot)
        nat6 = f'    ip6 saddr {ns_end6} oifname != "{hv}" masquerade\n'
        # neighbour discovery between the namespace and the host end of the veth
        local += (f'    iifname "{hv}" icmpv6 type {{ nd-neighbor-solicit, '
                  f'nd-neighbor-advert, nd-router-solicit }} accept\n')
    return (
        f"table inet {t}\n"
        f"delete table inet {t}\n"
        f"table inet {t} {{\n"
        f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n"
        f"{dnat}  }}\n"
        f"  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {ns_end} oifname != "{hv}" masquerade\n'
        f"{nat6}"
        f"  }}\n"
        f"  chain forward {{ type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{hv}" accept\n'
        f'    oifname "{hv}" ct state established,related accept\n'
        f'    oifname "{hv}" drop\n'
        f"  }}\n"
        f"  chain input {{ type filter hook input priority filter; policy accept;\n"
        f'    iifname "{hv}" ct state established,related accept\n'
        f"{local}"
        f'    iifname "{hv}" drop\n'
        f"  }}\n"
        f"}}\n"
    )


def _teardown(record: UplinkRecord, fd_box: list[int], state_path: Path) -> None:
    if os.getpid() != record.pid:
        # a fork()ed child exiting normally must not tear down its parent's uplink
        return
    for fd in fd_box:
        try:
            os.close(fd)
        except OSError:
            pass
    fd_box.clear()
    try:
        remove_objects(record)
    except Exception as e:  # pragma: no cover - best effort at exit
        log.warning("uplink %s: cleanup incomplete (%s); netstack.gateway.cleanup_stale() retries",
                    record.sandbox, e)
        return
    try:
        state_path.unlink()
    except FileNotFoundError:
        pass


def _enable_host_forwarding() -> None:
    path = Path("/proc/sys/net/ipv4/ip_forward")
    if path.read_text().strip() != "1":
        path.write_text("1\n")
        log.info("enabled net.ipv4.ip_forward on the host (needed for uplink NAT)")


_IPV6_CONF = Path("/proc/sys/net/ipv6/conf")


def host_ipv6_usable() -> bool:
    """Whether the host has IPv6 enabled (``net.ipv6.conf.all.disable_ipv6`` is 0).

    >>> isinstance(host_ipv6_usable(), bool)
    True
    """
    try:
        return (_IPV6_CONF / "all" / "disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


def _enable_host_forwarding6() -> None:
    """Turn on ``net.ipv6.conf.all.forwarding`` (for NAT66), keeping router
    advertisements: an interface with ``accept_ra=1`` would stop accepting them once
    the host forwards, so it gets ``accept_ra=2`` ("accept even when forwarding") first."""
    fwd = _IPV6_CONF / "all" / "forwarding"
    if fwd.read_text().strip() == "1":
        return
    for conf in sorted(_IPV6_CONF.iterdir()):
        if conf.name in ("all", "default", "lo"):
            continue
        try:
            if (conf / "accept_ra").read_text().strip() == "1":
                (conf / "accept_ra").write_text("2\n")
                log.info("set net.ipv6.conf.%s.accept_ra=2 (keeps router advertisements "
                         "once the host forwards IPv6)", conf.name)
        except OSError as e:  # an interface vanishing meanwhile
            log.debug("accept_ra of %s left as is: %s", conf.name, e)
    fwd.write_text("1\n")
    log.info("enabled net.ipv6.conf.all.forwarding on the host (needed for uplink NAT66)")


#: MTU of the uplink's real network (the veth to the host): the TAP never exceeds it;
#: a guest link with a larger MTU is cut back to it with GSO by the gateway loop.
UPLINK_MTU = 1500


class TapUplink(_FinalizedUplink):
    """The TAP uplink of one sandbox (see the module docstring for the topology).

    Creating it needs root. ``tap_fd`` is the TAP's file descriptor (IFF_TAP |
    IFF_NO_PI: bare Ethernet frames, one per read/write); the TAP vanishes when it is
    closed, the rest by :meth:`close`. ``vnet_hdr=True`` (the default) adds
    IFF_VNET_HDR: every read and write carries a 10-byte virtio-net header first; the
    gateway then writes runs of guest TCP segments, and guest frames larger than the
    uplink's MTU (the default guest link MTU is 65520), as GSO packets (no offloads are
    enabled for reads). ``vnet_hdr=False`` gives bare frames (a guest link MTU of at
    most 1500). Implements :class:`~netstack.gateway.RedirectingUplink`.

    >>> from netstack.gateway import AddressPlan, TapUplink
    >>> with TapUplink("doc-sbx", AddressPlan(4000)) as up:   # doctest: +SKIP
    ...     os.write(up.tap_fd, frame)
    """

    def __init__(self, sandbox: str, plan: AddressPlan, *, host_loopback: bool = False,
                 home: str | os.PathLike[str] | None = None, nonblocking: bool = False,
                 vnet_hdr: bool = True, ipv6_egress: bool | None = None) -> None:
        _check_plan(plan, ipv6_egress)
        self._host_ipv6 = plan.ipv6 and host_ipv6_usable()
        if ipv6_egress and not self._host_ipv6:
            raise UplinkError("ipv6_egress=True but IPv6 is disabled on this host "
                              "(net.ipv6.conf.all.disable_ipv6=1)")
        if os.geteuid() != 0:
            raise UplinkError("a TAP uplink needs root (network namespaces, TAP, nftables)")
        #: whether the guest's IPv6 traffic leaves (NAT66 to the host's address)
        self.ipv6_egress = self._host_ipv6 and ipv6_egress is not False
        self._intercept: tuple[tuple[int, ...], int, bool] | None = None
        self._dns_redirect = False
        self.sandbox = sandbox
        self.names = uplink_names(sandbox)
        self.plan = plan
        self._mtu = min(plan.mtu, UPLINK_MTU)
        self.host_loopback = bool(host_loopback)
        self.vnet_hdr = bool(vnet_hdr)
        self.home = Path(home) if home is not None else microvm_home()
        pid, start = process_identity()
        self._record = UplinkRecord(
            sandbox=sandbox, token=self.names["token"], pid=pid, pid_start=start,
            netns=self.names["netns"], host_links=[self.names["host_veth"]],
            nft_tables=[f"inet {self.names['nft_table']}"])
        self._state_path = state_dir(self.home) / f"{self.names['token']}.json"
        if self._state_path.exists():
            old = UplinkRecord.from_json(self._state_path.read_text(encoding="utf-8"))
            from netstack.gateway._state import owner_alive
            if owner_alive(old.pid, old.pid_start):
                raise UplinkError(f"sandbox {sandbox!r} already has an uplink owned by live "
                                  f"pid {old.pid} ({self._state_path})")
            remove_objects(old)
        self._fds: list[int] = []
        self._check_slot_free()
        try:
            write_record(self._record, self.home)
        except OSError as e:
            raise UplinkError(f"cannot write the uplink record under {str(self.home)!r}: {e}"
                              ) from e
        self._finalizer = weakref.finalize(self, _teardown, self._record, self._fds,
                                           self._state_path)
        try:
            self._create(nonblocking)
        except BaseException as e:
            self._finalizer()
            if isinstance(e, UplinkError):
                raise
            if isinstance(e, Exception):
                raise UplinkError(f"creating the uplink of sandbox {sandbox!r} failed: {e}"
                                  ) from e
            raise

    @property
    def tap_fd(self) -> int:
        """The TAP file descriptor the gateway reads and writes frames on.

        >>> up = TapUplink("doc-a", AddressPlan(4000))            # doctest: +SKIP
        >>> os.write(up.tap_fd, frame); reply = os.read(up.tap_fd, 65600)  # doctest: +SKIP
        """
        if not self._fds:
            raise UplinkError(f"uplink of sandbox {self.sandbox!r} is closed")
        return self._fds[0]

    @property
    def mtu(self) -> int:
        """The uplink TAP's MTU: the plan's MTU, at most :data:`UPLINK_MTU`.

        >>> TapUplink("doc-m", AddressPlan(4000, mtu=65520)).mtu   # doctest: +SKIP
        1500
        """
        return self._mtu

    def set_mtu(self, mtu: int) -> None:
        """Lower (or raise, up to :data:`UPLINK_MTU`) the uplink TAP's MTU.

        >>> up.set_mtu(1280)                                       # doctest: +SKIP
        """
        from pyroute2 import NetNS

        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= UPLINK_MTU:
            raise UplinkError(f"uplink mtu must be an int in 576..{UPLINK_MTU}, got {mtu!r}")
        with NetNS(self.names["netns"], flags=0) as ns:
            ns.link("set", index=ns.link_lookup(ifname=self.names["tap"])[0], mtu=mtu)
        self._mtu = mtu

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
               ) -> socket.socket:
        """A new socket that lives in the uplink's network namespace (for listeners that
        serve the guest there: the DNS-over-TCP forwarder, a TLS proxy; and connections
        to the guest: published ports). The one way netstack opens a socket in a
        namespace (:func:`netstack.gateway._netns.socket_in`).

        >>> srv = up.socket(socket.AF_INET6)                       # doctest: +SKIP
        """
        if self.closed:
            raise UplinkError(f"uplink of sandbox {self.sandbox!r} is closed")
        return socket_in(self.names["netns"], family, kind)

    def redirect_dns(self) -> None:
        """DNAT the guest's DNS over TCP to *any* address to the gateway address's port
        53 in the namespace, where a forwarder listens (the Gateway does this once its
        listeners are up; it reads the address the guest asked with
        ``SO_ORIGINAL_DST``). Idempotent.

        >>> up.redirect_dns()                                      # doctest: +SKIP
        """
        if self.closed:
            raise UplinkError(f"uplink of sandbox {self.sandbox!r} is closed")
        if not self._dns_redirect:
            self._dns_redirect = True
            self._load_netns_ruleset()

    def redirect_tcp(self, ports: Iterable[int], to_port: int, *,
                     block_udp: bool = True) -> None:
        """Redirect the guest's TCP to ``ports`` (any address) to ``to_port`` in the
        namespace, where a transparent proxy listens and reads the original destination
        with ``SO_ORIGINAL_DST``. ``block_udp`` drops the guest's UDP to the same ports
        (QUIC), so clients fall back to TCP and reach the proxy. Calling it again
        replaces the redirect.

        >>> up.redirect_tcp([443], 8443)                           # doctest: +SKIP
        """
        wanted = check_intercept_ports(ports, UplinkError)
        if isinstance(to_port, bool) or not isinstance(to_port, int) \
                or not 1 <= to_port <= 65535:
            raise UplinkError(f"to_port must be a port number 1..65535, got {to_port!r}")
        if self.closed:
            raise UplinkError(f"uplink of sandbox {self.sandbox!r} is closed")
        self._intercept = (wanted, to_port, bool(block_udp))
        self._load_netns_ruleset()
        log.info("uplink %s: guest TCP to ports %s goes to :%d in the namespace%s",
                 self.sandbox, sorted(set(wanted)), to_port,
                 " (UDP to them dropped)" if block_udp else "")

    def clear_redirects(self) -> None:
        """Remove the DNS and TCP redirects (:meth:`redirect_dns`, :meth:`redirect_tcp`);
        the gateway does this when it closes, so a later gateway on the same uplink
        starts clean. A closed uplink: nothing to do.

        >>> up.clear_redirects()                                   # doctest: +SKIP
        """
        if self.closed or (not self._dns_redirect and self._intercept is None):
            return
        self._dns_redirect, self._intercept = False, None
        self._load_netns_ruleset()

    def __repr__(self) -> str:
        return (f"TapUplink({self.sandbox!r}, slot={self.plan.slot}, "
                f"netns={self.names['netns']!r}, closed={self.closed})")

    # -- creation ------------------------------------------------------------------
    def _check_slot_free(self) -> None:
        from pyroute2 import IPRoute

        host_end, _ = transit_addresses(self.plan.slot)
        with IPRoute() as ipr:
            used = [a for a in ipr.get_addr(family=2)
                    if a.get_attr("IFA_ADDRESS") == str(host_end)]
            if used:
                link = ipr.get_links(used[0]["index"])[0].get_attr("IFLA_IFNAME")
                raise UplinkError(f"slot {self.plan.slot} already has an uplink (transit "
                                  f"address {host_end} is on {link}); lease slots with "
                                  f"allocate_slot()")

    def _create(self, nonblocking: bool) -> None:
        from pyroute2 import IPRoute, NetNS, netns

        n, plan = self.names, self.plan
        host_end, ns_end = transit_addresses(plan.slot)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        fd = os.open("/dev/net/tun", flags)
        self._fds.append(fd)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", n["tap"].encode(),
                                                _IFF_TAP | _IFF_NO_PI
                                                | (_IFF_VNET_HDR if self.vnet_hdr else 0)))
        netns.create(n["netns"])
        with IPRoute() as ipr:
            tap = ipr.link_lookup(ifname=n["tap"])[0]
            ipr.link("set", index=tap, address=plan.gateway_mac, mtu=self.mtu)
            ipr.link("set", index=tap, net_ns_fd=n["netns"])
            ipr.link("add", ifname=n["host_veth"], kind="veth",
                     peer={"ifname": n["ns_veth"], "net_ns_fd": n["netns"]})
            hv = ipr.link_lookup(ifname=n["host_veth"])[0]
            ipr.addr("add", index=hv, address=f"{host_end}/31")
            if self.ipv6_egress:
                ipr.addr("add", index=hv, address=str(transit_addresses6(plan.slot)[0]),
                         prefixlen=127, IFA_FLAGS=_NODAD)
            ipr.link("set", index=hv, state="up")
        with NetNS(n["netns"], flags=0) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            tap = ns.link_lookup(ifname=n["tap"])[0]
            ns.addr("add", index=tap, address=f"{plan.gateway_ipv4}/30")
            if plan.gateway_ipv6 is not None:
                ns.addr("add", index=tap, address=f"{plan.gateway_ipv6}/64")
            ns.link("set", index=tap, state="up")
            nv = ns.link_lookup(ifname=n["ns_veth"])[0]
            ns.addr("add", index=nv, address=f"{ns_end}/31")
            ns.link("set", index=nv, state="up")
            # onlink (RTNH_F_ONLINK): the /31 prefix route appears only once the veth has
            # carrier, which is asynchronous
            ns.route("add", dst="default", gateway=str(host_end), oif=nv, flags=4)
            if self.ipv6_egress:
                host6, ns6 = transit_addresses6(plan.slot)
                ns.addr("add", index=nv, address=str(ns6), prefixlen=127, IFA_FLAGS=_NODAD)
                ns.route("add", dst="::/0", gateway=str(host6), oif=nv, family=socket.AF_INET6,
                         flags=4)
        sysctls: dict[str, str | int] = {"net/ipv4/ip_forward": 1}
        if self._host_ipv6:
            # the gateway passes only neighbour solicitations/advertisements, but never
            # let the guest's link steer this namespace's routing anyway
            tap = n["tap"]
            sysctls[f"net/ipv6/conf/{tap}/accept_ra"] = 0
            sysctls[f"net/ipv6/conf/{tap}/accept_redirects"] = 0
        if self.ipv6_egress:
            sysctls["net/ipv6/conf/all/forwarding"] = 1
        write_sysctls(n["netns"], sysctls)
        self._load_netns_ruleset()
        _enable_host_forwarding()
        if self.ipv6_egress:
            _enable_host_forwarding6()
        if self.host_loopback:
            Path(f"/proc/sys/net/ipv4/conf/{n['host_veth']}/route_localnet").write_text("1\n")
        _run(["nft", "-f", "-"], host_ruleset(n, plan, self.host_loopback, self.ipv6_egress))
        log.info("uplink %s: netns %s, tap %s, veth %s<->%s, nft table %s (host_loopback=%s, "
                 "ipv6_egress=%s)", self.sandbox, n["netns"], n["tap"], n["host_veth"],
                 n["ns_veth"], n["nft_table"], self.host_loopback, self.ipv6_egress)

    def _load_netns_ruleset(self) -> None:
        _run(["ip", "netns", "exec", self.names["netns"], "nft", "-f", "-"],
             netns_ruleset(self.names, self.plan, self.host_loopback,
                           dns_redirect=self._dns_redirect, intercept=self._intercept))
