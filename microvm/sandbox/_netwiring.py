"""The network of one sandbox, as its supervisor builds it: slot lease, uplink, gateway,
and the TLS proxy that injects secrets.

Every piece is a seam: ``uplink_factory(sandbox_name, plan) -> netstack.gateway.Uplink``
(default: :class:`netstack.gateway.TapUplink` when this process may create a TAP (root), else
:class:`netstack.gateway.PasstUplink` (rootless, Debian's passt)) and ``proxy_factory(config) ->
SecretProxy`` (default :class:`tls_proxy.TlsProxy`). TLS reaches the proxy through the
uplink's redirect (TAP: nftables in the uplink namespace) or the gateway's steering NAT
(passt: loopback listeners that claim each flow's original destination through the
proxy's ``lookup``), see :meth:`netstack.gateway.Gateway.tls_interception`. A sandbox with secrets
whose uplink can do neither refuses to start (:class:`~microvm.errors.SandboxError`): a
placeholder must never reach an origin un-substituted.

Example::

    net = await SandboxNet.start("web", policy, secrets=[...], ports=[PortMapping(8080, 80)],
                                 listen=Path("/run/x/net.sock"))
    guest_cfg = net.guest_config()          # into the bootstrap's "network"
    await net.accept()                      # once QEMU connected its -netdev stream
    ...
    await net.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from microvm.errors import NoUplinkError, SandboxError
from microvm.sandbox._config import DnsOptions, PortMapping, TlsOptions
from netstack import NetworkPolicy
from netstack.errors import UplinkError
from netstack.gateway import (
    SANDBOX_GUEST_MTU,
    AddressPlan,
    Gateway,
    PasstUplink,
    PublishedPort,
    SlotLease,
    TapUplink,
    Uplink,
    allocate_slot,
    can_intercept_tls,
    find_passt,
)
from tls_proxy import CertificateAuthority, ProxyConfig, Secret, TlsProxy

log = logging.getLogger("microvm.sandbox.net")

__all__ = ["SandboxNet", "SecretProxy", "can_build_uplink", "can_create_tap", "default_uplink",
           "tls_home"]

#: The guest link MTU a sandbox gets (netstack's measured default; the uplink stays 1500)
GUEST_MTU: int = SANDBOX_GUEST_MTU


@runtime_checkable
class SecretProxy(Protocol):
    """What the sandbox needs of a secret-injecting proxy (``tls_proxy.TlsProxy`` has it).

    Example::

        proxy: SecretProxy = TlsProxy(ProxyConfig(ca=ca, secrets=secrets))
        await proxy.listen_transparent(sock=listening_socket)
    """

    async def listen_transparent(self, host: str | None = ..., port: int = ...,
                                 lookup: Callable[[tuple[str, int], tuple[str, int]], Any]
                                 | None = ..., *, sock: socket.socket | None = ...) -> Any:
        """Serve intercepted TLS connections accepted on ``sock``; ``lookup(peer, local)``
        gives each one's original destination (None: ``SO_ORIGINAL_DST``)."""
        ...

    async def close(self) -> None:
        """Stop serving and close every connection."""
        ...


def can_create_tap() -> bool:
    """True when this process may build a TAP uplink (root: namespaces, TAP, nftables).

    Example::

        >>> isinstance(can_create_tap(), bool)
        True
    """
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


def can_build_uplink() -> bool:
    """True when a sandbox here can get an uplink: a TAP (root) or passt (any user).

    Example::

        >>> isinstance(can_build_uplink(), bool)
        True
    """
    return can_create_tap() or find_passt() is not None


def _passt_forwards(ports: Sequence[PortMapping]) -> list[PublishedPort]:
    """The sandbox's published ports as passt forwards: passt binds a fixed host port,
    so host port 0 becomes a port free right now on 127.0.0.1."""
    out = []
    for p in ports:
        host = p.host_port
        if host == 0:
            kind = socket.SOCK_STREAM if p.protocol == "tcp" else socket.SOCK_DGRAM
            with socket.socket(socket.AF_INET, kind) as probe:
                probe.bind(("127.0.0.1", 0))
                host = int(probe.getsockname()[1])
        out.append(PublishedPort(host, p.guest_port, p.protocol))
    return out


def default_uplink(name: str, plan: AddressPlan, host_loopback: bool,
                   ports: Sequence[PortMapping] = ()) -> Uplink:
    """The uplink a sandbox gets by default: a TAP uplink with virtio-net headers (GSO)
    when this process may create one (root), else a rootless passt uplink.

    ``ports``: the sandbox's published ports; the passt uplink forwards them itself
    (passt's listeners on 127.0.0.1, ingress-checked by the gateway), the TAP uplink
    leaves them to the gateway. ``MICROVM_UPLINK=tap|passt`` in the environment forces
    one kind (e.g. the rootless uplink as root, to try what unprivileged users get). Raises
    :class:`~microvm.errors.NoUplinkError` when none can be built.

    Example::

        up = default_uplink("web", AddressPlan(3), host_loopback=False)
    """
    forced = os.environ.get("MICROVM_UPLINK", "")
    if forced not in ("", "tap", "passt"):
        raise NoUplinkError(f"MICROVM_UPLINK must be 'tap' or 'passt' (or unset), "
                            f"got {forced!r}")
    if forced == "passt":
        return PasstUplink(plan, host_loopback=host_loopback,
                           published_ports=_passt_forwards(ports))
    if forced == "tap" or can_create_tap():
        return TapUplink(name, plan, vnet_hdr=True, host_loopback=host_loopback)
    if find_passt() is not None:
        return PasstUplink(plan, host_loopback=host_loopback,
                           published_ports=_passt_forwards(ports))
    raise NoUplinkError(
        "this sandbox's network policy allows traffic, but no uplink can be built: the TAP "
        "uplink needs root (or CAP_NET_ADMIN) and /dev/net/tun, the rootless one Debian's "
        "passt (apt-get install passt); or use network='none'")


def slot_home() -> Path | None:
    """Where network slot leases live: host-wide (``/run/microvm``) for root, whose TAP
    uplinks' addresses are host-wide too, so sandboxes of different ``$MICROVM_HOME`` s
    (two users of the library, two fleet nodes on one host) never race for a slot; else
    ``$MICROVM_HOME`` (``None``).

    Example::

        >>> slot_home() in (None, Path("/run/microvm"))
        True
    """
    return Path("/run/microvm") if os.geteuid() == 0 else None


def tls_home() -> Path:
    """Where the sandboxes' interception CA lives: ``$MICROVM_HOME/tls``.

    Example::

        >>> tls_home().name
        'tls'
    """
    from rootfs import microvm_home

    return microvm_home() / "tls"


def _wants_host_loopback(policy: NetworkPolicy) -> bool:
    d = policy.to_dict()
    if d["default_egress"] == "allow":
        return True
    for r in d["rules"]:
        dest = r["destination"]
        if r["action"] == "allow" and r["direction"] in ("egress", "any") and (
                dest == "any" or (isinstance(dest, dict) and dest.get("group") == "host")) \
                and r["ports"] != [{"start": 53, "end": 53}]:
            return True
    return False


class SandboxNet:
    """The running network of one sandbox (see the module docstring)."""

    def __init__(self, name: str, policy: NetworkPolicy, lease: SlotLease, plan: AddressPlan,
                 listener: socket.socket) -> None:
        self.name = name
        self.policy = policy
        self.lease = lease
        self.plan = plan
        self.listener = listener
        self.uplink: Uplink | None = None
        self.gateway: Gateway | None = None
        self.proxy: SecretProxy | None = None
        self.ca: CertificateAuthority | None = None

    @classmethod
    def prepare(cls, name: str, policy: NetworkPolicy, listen: Path | socket.socket, *,
                secrets: Sequence[Secret] = (), ports: Sequence[PortMapping] = (),
                uplink_factory: Callable[[str, AddressPlan], Uplink] | None = None
                ) -> SandboxNet:
        """Lease a slot, build the uplink and listen on ``listen`` for the VMM's frames
        (a unix socket path, or a socket already listening there: the VMM may then be
        started first and connect while the network is built). ``ports``: the published
        ports (the same as given to :meth:`accept`); the default uplink factory hands
        them to an uplink that forwards ports itself (passt); a custom
        ``uplink_factory`` configures its own.

        Example::

            net = SandboxNet.prepare("web", policy, Path("/run/web/net.sock"))
        """
        factory = uplink_factory or (lambda n, p: default_uplink(
            n, p, _wants_host_loopback(policy), ports))
        # kernel objects are host-wide while slot leases are per $MICROVM_HOME: a slot whose
        # addresses another home's sandbox holds is skipped (its lease kept until we are up)
        skipped: list[SlotLease] = []
        if isinstance(listen, socket.socket):
            listener, path = listen, str(listen.getsockname())
        else:
            listener, path = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), str(listen)
        uplink_name = f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
        try:
            if not isinstance(listen, socket.socket):
                with contextlib.suppress(FileNotFoundError):
                    listen.unlink()
                listener.bind(path)
                listener.listen(1)
            for _ in range(64):
                lease = allocate_slot(home=slot_home())
                plan = AddressPlan(lease.slot, mtu=GUEST_MTU)
                try:
                    uplink = factory(uplink_name, plan)
                except UplinkError as e:
                    if "already has an uplink" not in str(e):
                        lease.release()
                        raise
                    skipped.append(lease)
                    continue
                break
            else:
                raise SandboxError("no free network slot: 64 slots in a row are used by "
                                   "other sandboxes on this host")
            self = cls(name, policy, lease, plan, listener)
            self.uplink = uplink
            try:
                if secrets and not can_intercept_tls(uplink):
                    raise SandboxError(
                        "this sandbox has secrets, but its uplink cannot steer TLS to the "
                        "interception proxy: refusing to start (a placeholder must never "
                        "reach an origin un-substituted)")
                if secrets:
                    self.ca = CertificateAuthority.load_or_create(tls_home())
            except BaseException:
                uplink.close()
                lease.release()
                raise
            return self
        except BaseException:
            listener.close()
            raise
        finally:
            for held in skipped:
                held.release()

    def guest_config(self) -> dict[str, Any]:
        """The bootstrap's ``network`` entry (addresses, gateway, DNS, MTU).

        Example::

            cfg = net.guest_config(); cfg["mtu"]
        """
        return self.plan.guest_config()

    def ca_pem(self) -> str | None:
        """The interception CA's certificate (installed in the guest) when secrets are set.

        Example::

            pem = net.ca_pem()
        """
        if self.ca is None or self.ca.cert_path is None:
            return None
        return self.ca.cert_path.read_text()

    async def accept(self, *, ports: Sequence[PortMapping], dns: DnsOptions, tls: TlsOptions,
                     secrets: Sequence[Secret], pcap: str | None,
                     proxy_factory: Callable[[ProxyConfig], SecretProxy] | None = None,
                     timeout: float = 60.0) -> None:
        """Accept the VMM's connection, start the gateway and (with secrets) the proxy.

        Example::

            await net.accept(ports=[], dns=DnsOptions(), tls=TlsOptions(), secrets=[], pcap=None)
        """
        loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        conn, _ = await asyncio.wait_for(loop.sock_accept(self.listener), timeout)
        conn.setblocking(True)
        self.listener.close()
        assert self.uplink is not None
        # an uplink that forwards ports itself (passt) got them from prepare()
        forwarded = bool(getattr(self.uplink, "forwarded_ports", ()))
        gateway = await asyncio.to_thread(
            Gateway, self.policy, uplink=self.uplink, guest_socket=conn, transport="stream",
            dns_upstreams=list(dns.nameservers) or None, dns_timeout=dns.timeout,
            rebind_protection=dns.rebind_protection, pcap=pcap,
            published_ports=[] if forwarded else [p.to_str() for p in ports], own_uplink=True,
            mtu=self.plan.mtu)
        self.gateway = gateway
        if secrets:
            assert self.ca is not None
            interception = gateway.tls_interception(list(tls.ports))
            # the gateway's address (and its name) is the host's loopback, as the uplink's
            # DNAT makes it for plain traffic; the proxy connects from the host itself
            host_lo = {self.plan.host_alias: "127.0.0.1", str(self.plan.gateway_ipv4): "127.0.0.1"}
            cfg = ProxyConfig(ca=self.ca, secrets=list(secrets), bypass=list(tls.bypass),
                              upstream_ca_files=list(tls.upstream_ca_certs), resolve=host_lo)
            self.proxy = (proxy_factory or TlsProxy)(cfg)
            try:
                for sock in interception.sockets:
                    await self.proxy.listen_transparent(sock=sock, lookup=interception.lookup)
            except BaseException:
                interception.close()
                raise
        log.info("network of %s up: guest %s, mtu %d, %d published port(s), %s",
                 self.name, self.plan.guest_ipv4, self.plan.mtu, len(ports),
                 "TLS interception on" if secrets else "no TLS interception")

    def stats(self) -> dict[str, Any]:
        """The gateway's counters (empty before it started).

        Example::

            net.stats()["guest_frames"]
        """
        return {} if self.gateway is None else self.gateway.stats()

    def rule_counters(self) -> list[dict[str, Any]]:
        """Per-rule hit counters as plain dicts.

        Example::

            net.rule_counters()[0]["frames"]
        """
        if self.gateway is None:
            return []
        return [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else dict(vars(c))
                for c in self.gateway.rule_counters()]

    def published(self) -> dict[str, int]:
        """Published ports as ``{"tcp:GUEST" | "udp:GUEST": host_port}``.

        Example::

            net.published()["tcp:80"]
        """
        if self.gateway is None:
            return {}
        out = {f"tcp:{g}": h for g, h in self.gateway.published.items()}
        out.update({f"udp:{g}": h for g, h in self.gateway.published_udp.items()})
        return out

    async def close(self) -> None:
        """Stop the proxy, the gateway and the uplink; release the slot (idempotent).

        Example::

            await net.close()
        """
        if self.proxy is not None:
            proxy, self.proxy = self.proxy, None
            try:
                await proxy.close()
            except Exception as e:  # pragma: no cover - best effort
                log.warning("closing the TLS proxy failed: %s", e)
        if self.gateway is not None:
            gw, self.gateway = self.gateway, None
            await asyncio.to_thread(gw.close)
        elif self.uplink is not None:
            up, self.uplink = self.uplink, None
            await asyncio.to_thread(up.close)
        with contextlib.suppress(OSError):
            self.listener.close()
        self.lease.release()
