"""passt uplink: the gateway's allowed traffic leaves through Debian's ``passt``, no root.

Topology for one sandbox (any user)::

    gateway process                                passt (child, own session)
    C loop  --u32-BE framed stream (socketpair)-->  --fd N: a user-mode TCP/IP stack
            <--  replies                       --   sockets of the host (as the user)

``passt --fd`` speaks the same framing as QEMU's ``-netdev stream`` (a 4-byte
big-endian length before every Ethernet frame), so the gateway's C loop reads and
writes it itself (``stream_framing``): no relay, no copy in Python. Every guest frame
is classified first, exactly as with :class:`~netstack.gateway.TapUplink`; passt sees only
allowed traffic and DNS never reaches it un-steered (the forwarder answers UDP DNS; DNS
over TCP is steered to the forwarder, see below).

Addresses: passt is started with the plan's addresses (``-a`` guest, ``-g`` gateway,
``-n 30``, ``-M`` gateway MAC), so the guest sees the same address plan as with the
TAP uplink and no translation is needed between the two: passt answers ARP (and, with
IPv6 egress, neighbour solicitations) for the gateway with the gateway MAC, and opens
host sockets for the guest's connections. Its DHCP, DHCPv6, router advertisements and
DNS information are off (the guest is configured by the sandbox). passt's own mapping of
TCP/UDP to the gateway address onto the host's 127.0.0.1 (and ::1) is always on: the
gateway's steering NAT needs it (below). ``host_loopback`` says whether the guest itself
may use it (the policy's ``host`` group, still decided by the policy first); without it
the gateway's C loop drops guest TCP/UDP to the gateway address that it did not steer.

Ownership: passt runs in its own session and process group, inherits only its end of
the socket pair, and exits when our end closes (``--fd`` implies ``--one-off``), so it
dies with our process even on SIGKILL; :meth:`PasstUplink.close`, the garbage
collector and interpreter exit also terminate its process group. Started as root,
passt drops to ``nobody`` by itself (``runas`` picks another user); started as any
other user, it keeps that user. Readiness is proven before the constructor returns: an
ARP request for the gateway must be answered through the stream.

Capabilities: a core :class:`~netstack.gateway.Uplink`, not a
:class:`~netstack.gateway.RedirectingUplink` (there is no local network stack to put
listeners in), but a *steering* one (``steer_to_host``): the gateway's C loop NATs guest
DNS over TCP (any address) and the intercepted TLS ports to pools of listeners on the
host's loopback, which claim each flow's original destination from the loop
(``netstack/csrc/steer.c``, :mod:`netstack.gateway._steering`,
:meth:`~netstack.gateway.Gateway.tls_interception`); a claim is honoured only for a connection
from passt's uid (``peer_uid``). Published ports are passt's own forwards
(``forwarded_ports``: listeners on the host's 127.0.0.1 owned by our passt child),
ingress-checked by the gateway's C loop like the TAP uplink's.

>>> from netstack.gateway import AddressPlan
>>> passt_argv(AddressPlan(0), fd=5)[:4]
['passt', '--foreground', '--quiet', '--fd']
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import IO, Final

from netstack.errors import UplinkError
from netstack.gateway._addressing import AddressPlan
from netstack.gateway._published import PublishedPort
from netstack.gateway._uplink import _check_plan, _FinalizedUplink

log = logging.getLogger("netstack.gateway")

#: The largest IP packet passt carries on its guest side (its default and maximum MTU).
PASST_MTU: Final = 65520
#: Socket buffer size of the framed stream between the gateway and passt.
STREAM_BUFFER: Final = 4 << 20
_READY_TIMEOUT = 5.0


def find_passt(binary: str = "passt") -> str | None:
    """The path of the ``passt`` executable, or None if it is not installed.

    >>> find_passt("/nonexistent/passt") is None
    True
    """
    return shutil.which(binary)


def host_has_ipv6_route() -> bool:
    """Whether the host has an IPv6 default route (passt can carry IPv6 egress).

    >>> isinstance(host_has_ipv6_route(), bool)
    True
    """
    try:
        with open("/proc/net/ipv6_route", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 10 and parts[0] == "0" * 32 and parts[1] == "00" \
                        and parts[9] != "lo":
                    return True
    except OSError:
        return False
    return False


def _check_forwards(ports: Iterable[PublishedPort | tuple[int, int] | str]
                    ) -> tuple[PublishedPort, ...]:
    if isinstance(ports, str | bytes):
        raise UplinkError(f"published_ports must be a list of mappings, got the string "
                          f"{ports!r}")
    out = tuple(PublishedPort.parse(p) for p in ports)
    for m in out:
        if m.host_port == 0:
            raise UplinkError(f"a passt uplink needs a fixed host port (passt binds it), got "
                              f"host_port 0 for guest port {m.guest_port}")
        if ipaddress.ip_address(m.bind).version == 6:
            raise UplinkError(f"a passt uplink publishes on IPv4 only, got bind {m.bind!r}")
    return out


def passt_argv(plan: AddressPlan, fd: int, *, binary: str = "passt",
               host_loopback: bool = False, ipv6_egress: bool = False,
               published_ports: Sequence[PublishedPort] = (), runas: str | None = None,
               pcap: str | None = None) -> list[str]:
    """The passt command line for ``plan`` on the connected stream socket ``fd``.

    >>> argv = passt_argv(AddressPlan(0), fd=7, published_ports=[PublishedPort(8080, 80)])
    >>> argv[argv.index("-a") + 1], argv[argv.index("-t") + 1], "--no-map-gw" in argv
    ('172.16.0.2', '127.0.0.1/8080:80', True)
    """
    argv = [binary, "--foreground", "--quiet", "--fd", str(fd),
            "--mtu", str(min(plan.mtu, PASST_MTU)),
            "-a", str(plan.guest_ipv4), "-n", "30", "-g", str(plan.gateway_ipv4),
            "--mac-addr", plan.gateway_mac,
            "--no-dhcp", "--no-dhcpv6", "--no-ra", "--no-dhcp-dns", "--no-dhcp-search"]
    if ipv6_egress and plan.guest_ipv6 is not None and plan.gateway_ipv6 is not None:
        argv += ["-a", str(plan.guest_ipv6), "-g", str(plan.gateway_ipv6)]
    else:
        argv += ["--ipv4-only", "--no-ndp"]
    if not host_loopback:
        argv.append("--no-map-gw")
    for proto in ("tcp", "udp"):
        specs = [f"{m.bind}/{m.host_port}:{m.guest_port}" for m in published_ports
                 if m.protocol == proto]
        for spec in specs:
            argv += ["-t" if proto == "tcp" else "-u", spec]
        if not specs:
            argv += ["-t" if proto == "tcp" else "-u", "none"]
    if runas is not None:
        argv += ["--runas", runas]
    if pcap is not None:
        argv += ["--pcap", pcap]
    return argv


def _arp_request(plan: AddressPlan) -> bytes:
    mac = bytes(int(x, 16) for x in plan.guest_mac.split(":"))
    return (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac + plan.guest_ipv4.packed + b"\0" * 6 + plan.gateway_ipv4.packed)


def _stop_process(proc: subprocess.Popen[bytes], ours: socket.socket | None,
                  errlog: IO[bytes] | None) -> None:
    """Close our end (passt exits on EOF), then make sure its process group is gone."""
    if ours is not None:
        ours.close()
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if errlog is not None:
        errlog.close()


def passt_uid(pid: int) -> int | None:
    """The effective uid of process ``pid`` (``/proc/PID/status``), None if unknown.

    >>> import os
    >>> passt_uid(os.getpid()) == os.geteuid()
    True
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PasstUplink(_FinalizedUplink):
    """A rootless uplink: ``passt`` behind a framed socket pair (see the module docstring).

    ``host_loopback``: guest TCP/UDP to the gateway address reaches the host's
    127.0.0.1 (the policy's ``host`` group decides first). ``ipv6_egress``: None = when
    the plan has IPv6 and the host an IPv6 default route. ``published_ports``: host
    ``127.0.0.1:host_port`` -> guest port, bound by passt (TCP and UDP; fixed host
    ports). ``runas``: passt's ``--runas`` (only meaningful as root; passt's default
    there is ``nobody``). ``pcap``: passt's own capture of the frames it saw.

    >>> with PasstUplink(AddressPlan(4000)) as up:      # doctest: +SKIP
    ...     gw = Gateway(NetworkPolicy.public_only(), uplink=up, guest_socket=vmm_end)
    """

    #: The C loop reads and writes ``tap_fd`` as a u32-BE length-prefixed stream.
    stream_framing: Final = True
    #: passt has no virtio-net header; it takes frames of up to :data:`PASST_MTU`.
    vnet_hdr: Final = False
    #: guest traffic to the gateway address reaches the host's loopback (the steering NAT)
    steer_to_host: Final = True

    def __init__(self, plan: AddressPlan, *, host_loopback: bool = False,
                 ipv6_egress: bool | None = None,
                 published_ports: Iterable[PublishedPort | tuple[int, int] | str] = (),
                 runas: str | None = None, pcap: str | os.PathLike[str] | None = None,
                 binary: str = "passt") -> None:
        _check_plan(plan, ipv6_egress)
        if runas is not None and (not isinstance(runas, str) or not runas
                                  or any(c.isspace() for c in runas)):
            raise UplinkError(f"runas must be a user name, UID or UID:GID, got {runas!r}")
        self._forwards = _check_forwards(published_ports)
        path = find_passt(binary)
        if path is None:
            raise UplinkError(f"passt not found ({binary!r}); install Debian's 'passt' "
                              f"package (apt-get install passt)")
        host6 = plan.ipv6 and host_has_ipv6_route()
        if ipv6_egress and not host6:
            raise UplinkError("ipv6_egress=True but the host has no IPv6 default route")
        #: whether the guest's IPv6 traffic leaves (through passt's IPv6 sockets)
        self.ipv6_egress = bool(host6 and ipv6_egress is not False)
        self.plan = plan
        self.host_loopback = bool(host_loopback)
        self._mtu = min(plan.mtu, PASST_MTU)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in (ours, theirs):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, STREAM_BUFFER)
                except OSError:
                    pass
        self._peer_uid: int | None = None
        # the gateway mapping is always on (the steering NAT's listeners are on the host's
        # loopback); the C loop enforces host_loopback for the guest's own traffic
        self.argv = passt_argv(plan, theirs.fileno(), binary=path, host_loopback=True,
                               ipv6_egress=self.ipv6_egress, published_ports=self._forwards,
                               runas=runas, pcap=None if pcap is None else os.fspath(pcap))
        errlog = tempfile.TemporaryFile(prefix="passt-")  # noqa: SIM115 (kept: passt writes it)
        try:
            proc = subprocess.Popen(self.argv, pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                    start_new_session=True)
        except OSError as e:
            ours.close()
            errlog.close()
            raise UplinkError(f"cannot start passt ({path}): {e}") from e
        finally:
            theirs.close()
        self._sock: socket.socket | None = ours
        self._proc = proc
        self._errlog = errlog
        self._finalizer = weakref.finalize(self, _stop_process, proc, ours, errlog)
        try:
            self._wait_ready()
        except BaseException:
            self._finalizer()
            raise
        log.info("passt uplink for %s up: pid %d, ipv6_egress=%s, host_loopback=%s, "
                 "forwards %s", plan.guest_ipv4, proc.pid, self.ipv6_egress,
                 self.host_loopback, [f"{m.bind}:{m.host_port}->{m.guest_port}/{m.protocol}"
                                      for m in self._forwards])

    def _wait_ready(self) -> None:
        """Send an ARP request for the gateway and wait for passt's answer."""
        assert self._sock is not None
        arp = _arp_request(self.plan)
        self._sock.sendall(struct.pack("!I", len(arp)) + arp)
        deadline = time.monotonic() + _READY_TIMEOUT
        buf = b""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            r, _, _ = select.select([self._sock], [], [], 0.1)
            if not r:
                continue
            chunk = self._sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 4:
                n = struct.unpack("!I", buf[:4])[0]
                if len(buf) < 4 + n:
                    break
                frame, buf = buf[4:4 + n], buf[4 + n:]
                if len(frame) >= 42 and frame[12:14] == b"\x08\x06" and frame[20:22] == b"\0\2":
                    return
        code = self._proc.poll()
        raise UplinkError(f"passt did not come up ({'exit ' + str(code) if code is not None else 'no ARP answer in 5 s'}): "
                          f"{self.passt_log() or 'no output'}")

    def passt_log(self) -> str:
        """What passt printed so far (syslog noise removed).

        >>> up.passt_log()                                # doctest: +SKIP
        ''
        """
        if self._errlog.closed:
            return ""
        self._errlog.seek(0)
        text = self._errlog.read(65536).decode(errors="replace")
        return "; ".join(line for line in text.splitlines()
                         if line.strip() and "to syslog" not in line)

    # -- the Uplink protocol -------------------------------------------------------------
    @property
    def tap_fd(self) -> int:
        """Our end of the framed stream to passt (the gateway's C loop owns the I/O).

        >>> PasstUplink(AddressPlan(4000)).tap_fd >= 0   # doctest: +SKIP
        True
        """
        if self._sock is None or not self._finalizer.alive:
            raise UplinkError("passt uplink is closed")
        return self._sock.fileno()

    @property
    def mtu(self) -> int:
        """The largest IP packet carried: the plan's MTU, at most :data:`PASST_MTU`.

        >>> PasstUplink(AddressPlan(4000)).mtu            # doctest: +SKIP
        65520
        """
        return self._mtu

    def set_mtu(self, mtu: int) -> None:
        """Carry at most ``mtu``-byte packets (passt takes any frame up to its MTU, so
        only the recorded value changes).

        >>> up.set_mtu(1500)                              # doctest: +SKIP
        """
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= PASST_MTU:
            raise UplinkError(f"uplink mtu must be an int in 576..{PASST_MTU}, got {mtu!r}")
        self._mtu = mtu

    @property
    def forwarded_ports(self) -> tuple[PublishedPort, ...]:
        """The published ports passt forwards to the guest (host side: passt's listeners).

        >>> PasstUplink(AddressPlan(1), published_ports=["8080:80"]).forwarded_ports  # doctest: +SKIP
        (PublishedPort(host_port=8080, guest_port=80, protocol='tcp', bind='127.0.0.1'),)
        """
        return self._forwards

    @property
    def peer_uid(self) -> int | None:
        """The uid owning passt's host sockets (its effective uid after it dropped
        privileges: ``nobody`` when started as root), None if it cannot be read.

        >>> up.peer_uid == os.geteuid()                   # doctest: +SKIP
        True
        """
        if self._peer_uid is None and self._proc.poll() is None:
            self._peer_uid = passt_uid(self._proc.pid)
        return self._peer_uid

    @property
    def pid(self) -> int:
        """passt's process id (also its process group and session id).

        >>> up.pid > 0                                    # doctest: +SKIP
        True
        """
        return self._proc.pid

    def close(self) -> None:
        """Close the stream (passt exits) and make sure passt's process group is gone
        (idempotent).

        >>> with PasstUplink(AddressPlan(4000)) as up:   # doctest: +SKIP
        ...     pass
        """
        self._finalizer()
        self._sock = None

    def __repr__(self) -> str:
        return (f"PasstUplink(slot={self.plan.slot}, pid={self._proc.pid}, "
                f"closed={self.closed})")

