"""Test topology for end-to-end gateway tests (needs root; no traffic leaves the host).

::

    netns mvg-T ("guest": its kernel stands in for the VM)
      eth0 (TAP, guest MAC, 172.16.x.2/30, default via 172.16.x.1)
        ^ fd
    FakeVmm: TAP fd <-> unix stream socket, u32 big-endian length + Ethernet frame
        ^ socket (QEMU -netdev stream / libkrun unixstream framing)
    [the gateway under test: Topology.vmm_socket is its end]
        v
    TapUplink (netns microvm-..., NAT) -> host -> veth mvuT -> netns mvu-T ("upstream")
                                                   lo: 198.51.100.10 (HTTP :80, HTTPS :443)
                                                       198.51.100.53 (DNS :53, UDP+TCP)

The host routes 198.51.100.0/24 and 203.0.113.0/24 to the upstream namespace only
(its veth); nothing else is routed anywhere new. HTTPS uses a trustme test CA
(``Topology.ca_file``). :class:`StreamTapPump` is the frame mover of the fake VMM, and
also serves as a trivial allow-all "gateway" between ``vmm_socket`` and an uplink TAP.

Everything is removed by :meth:`Topology.close` (also on errors during setup).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import trustme
from pyroute2 import IPRoute, NetNS, netns

from netstack.gateway import AddressPlan, PasstUplink, TapUplink, cleanup_stale, uplink_names
from netstack.gateway._netns import write_sysctls
from tests.netstack_gateway.kernel_objects import snapshot

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
UPSTREAM_IP = "198.51.100.10"
UPSTREAM_DNS_IP = "198.51.100.53"
UPSTREAM_NETS = ("198.51.100.0/24", "203.0.113.0/24")
UPSTREAM_NAME = "web.upstream.test"
#: with an IPv6 plan: the upstream's IPv6 address (documentation prefix), its name, and
#: the prefix the host routes to the upstream namespace
UPSTREAM_IP6 = "2001:db8:100::10"
UPSTREAM_NAME6 = "web6.upstream.test"
UPSTREAM_NET6 = "2001:db8:100::/64"
_NODAD = 0x02
_REPO = Path(__file__).resolve().parents[2]


def open_tap(name: str, vnet_hdr: bool = False) -> int:
    """Create a non-persistent TAP ``name`` (IFF_TAP|IFF_NO_PI, plus IFF_VNET_HDR if
    ``vnet_hdr``) in this namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class StreamTapPump:
    """Moves frames both ways between a TAP fd and a VMM frame socket.

    ``mode="stream"``: u32 big-endian length + frame (QEMU ``-netdev stream``, libkrun
    unixstream, passt). ``mode="dgram"``: one bare frame per datagram (QEMU ``dgram``,
    libkrun unixgram); with ``vfkit=True`` the pump sends the 4-byte ``VFKT`` handshake
    first (as libkrun's NET_FLAG_VFKIT does). A dgram pump that *receives* a first
    datagram ``VFKT`` consumes it (``self.handshake`` records it) instead of writing it
    to the TAP, as gvproxy does.
    """

    def __init__(self, sock: socket.socket, tap_fd: int, name: str = "pump", *,
                 mode: str = "stream", vfkit: bool = False) -> None:
        if mode not in ("stream", "dgram"):
            raise ValueError(f"mode must be 'stream' or 'dgram', got {mode!r}")
        self.sock = sock
        self.tap_fd = tap_fd
        self.mode = mode
        self.handshake: bytes | None = None
        self.stop_event = threading.Event()
        self.frames = {"to_stream": 0, "to_tap": 0}
        self.errors: list[BaseException] = []
        if vfkit:
            sock.send(b"VFKT")
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True,
                                         name=f"{name}-{f.__name__}")
                        for f in (self._tap_to_stream, self._stream_to_tap)]
        for t in self.threads:
            t.start()

    def _guard(self, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except OSError as e:
            if not self.stop_event.is_set():
                self.errors.append(e)

    def _tap_to_stream(self) -> None:
        while not self.stop_event.is_set():
            r, _, _ = select.select([self.tap_fd], [], [], 0.1)
            if not r:
                continue
            frame = os.read(self.tap_fd, 65600)
            if self.mode == "stream":
                self.sock.sendall(struct.pack("!I", len(frame)) + frame)
            else:
                self.sock.send(frame)
            self.frames["to_stream"] += 1

    def _read_frame(self) -> bytes | None:
        if self.mode == "dgram":
            frame = self.sock.recv(65600)
            if self.handshake is None and frame == b"VFKT" \
                    and self.frames["to_tap"] == 0:
                self.handshake = frame
                return b""
            return frame
        header = _recv_exact(self.sock, 4)
        if header is None:
            return None
        (length,) = struct.unpack("!I", header)
        if length > 65549 + 1024:
            raise OSError(f"oversized frame length {length}")
        return _recv_exact(self.sock, length)

    def _stream_to_tap(self) -> None:
        while not self.stop_event.is_set():
            r, _, _ = select.select([self.sock], [], [], 0.1)
            if not r:
                continue
            frame = self._read_frame()
            if frame is None:
                return
            if frame:
                os.write(self.tap_fd, frame)
                self.frames["to_tap"] += 1

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(5)


class FakeVmm(StreamTapPump):
    """The guest namespace's TAP <-> the VMM frame socket (stream or datagram framing)."""


class Topology:
    """Guest and upstream namespaces, the fake VMM, and the upstream servers."""

    def __init__(self, plan: AddressPlan, workdir: Path, token: str | None = None, *,
                 upstream: bool = True, mode: str = "stream", vfkit: bool = False,
                 vmm_connect: Path | None = None, guest_vnet_hdr: bool = False) -> None:
        self.plan = plan
        #: the guest TAP speaks virtio-net headers; no Python fake VMM is started (it
        #: does not): take the ends with :meth:`detach_vmm` (the benchmark's C pump)
        self.guest_vnet_hdr = guest_vnet_hdr
        self.token = token or f"{os.getpid() % 0xFFFFF:05x}"
        self.guest_ns = f"mvg-{self.token}"
        self.upstream_ns = f"mvu-{self.token}"
        self.upstream_veth = f"mvu{self.token}"
        idx = (os.getpid() % 16000) * 4
        base = ipaddress.IPv4Address("10.213.0.0") + idx
        self.upstream_host_end, self.upstream_ns_end = base + 1, base + 2
        base6 = ipaddress.IPv6Address("fd42:6d73:75::") + 2 * (os.getpid() % 16000)
        self.upstream6 = (str(base6), str(base6 + 1))  # host end, namespace end (/127)
        self.workdir = workdir
        self.with_upstream = upstream
        self.mode, self.vfkit, self.vmm_connect = mode, vfkit, vmm_connect
        self.servers: subprocess.Popen[str] | None = None
        self.vmm: FakeVmm | None = None
        self._guest_tap_fd: int | None = None
        self.vmm_socket: socket.socket | None = None
        self._vmm_end: socket.socket | None = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------
    def _setup(self) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert(UPSTREAM_NAME, UPSTREAM_IP)
        self.ca_file = self.workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert_file, key_file = self.workdir / "cert.pem", self.workdir / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))

        # guest namespace with its TAP "eth0"
        netns.create(self.guest_ns)
        tmp_name = f"mvg{self.token}"
        self._guest_tap_fd = open_tap(tmp_name, self.guest_vnet_hdr)
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=tmp_name)[0]
            ipr.link("set", index=idx, net_ns_fd=self.guest_ns)
        with NetNS(self.guest_ns, flags=0) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            idx = ns.link_lookup(ifname=tmp_name)[0]
            ns.link("set", index=idx, ifname="eth0", address=self.plan.guest_mac,
                    mtu=self.plan.mtu)
            if self.plan.guest_ipv6 is None:
                write_sysctls(self.guest_ns, {"net/ipv6/conf/eth0/disable_ipv6": 1})
            else:
                ns.addr("add", index=idx, address=str(self.plan.guest_ipv6), prefixlen=64,
                        IFA_FLAGS=_NODAD)
            ns.addr("add", index=idx, address=f"{self.plan.guest_ipv4}/30")
            ns.link("set", index=idx, state="up")
            ns.route("add", dst="default", gateway=str(self.plan.gateway_ipv4), oif=idx,
                     flags=4)
            if self.plan.gateway_ipv6 is not None:
                ns.route("add", dst="::/0", gateway=str(self.plan.gateway_ipv6), oif=idx,
                         family=socket.AF_INET6, flags=4)

        if self.with_upstream:
            self._setup_upstream(cert_file, key_file)

        # the fake VMM and the socket the gateway gets: a socketpair, or (like QEMU's
        # server=off) a connection to the gateway's listening unix socket
        kind = socket.SOCK_STREAM if self.mode == "stream" else socket.SOCK_DGRAM
        if self.vmm_connect is None:
            self.vmm_socket, self._vmm_end = socket.socketpair(socket.AF_UNIX, kind)
        else:
            self._vmm_end = socket.socket(socket.AF_UNIX, kind)
            if kind == socket.SOCK_DGRAM:  # libkrun unixgram binds its own address
                self._vmm_end.bind(str(self.workdir / f"vmm-{self.token}.sock"))
            self._vmm_end.connect(str(self.vmm_connect))
        if not self.guest_vnet_hdr:
            self.vmm = FakeVmm(self._vmm_end, self._guest_tap_fd, name="fakevmm",
                               mode=self.mode, vfkit=self.vfkit)

    def _setup_upstream(self, cert_file: Path, key_file: Path) -> None:
        # upstream namespace with TEST-NET addresses on lo, reached over a veth
        netns.create(self.upstream_ns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.upstream_veth, kind="veth",
                     peer={"ifname": "up0", "net_ns_fd": self.upstream_ns})
            hv = ipr.link_lookup(ifname=self.upstream_veth)[0]
            ipr.addr("add", index=hv, address=f"{self.upstream_host_end}/30")
            ipr.link("set", index=hv, state="up")
            for net in UPSTREAM_NETS:
                ipr.route("add", dst=net, gateway=str(self.upstream_ns_end), oif=hv, flags=4)
            if self.plan.ipv6:
                ipr.addr("add", index=hv, address=self.upstream6[0], prefixlen=127,
                         IFA_FLAGS=_NODAD)
                ipr.route("add", dst=UPSTREAM_NET6, gateway=self.upstream6[1], oif=hv,
                          family=socket.AF_INET6, flags=4)
        with NetNS(self.upstream_ns, flags=0) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            for ip in (UPSTREAM_IP, UPSTREAM_DNS_IP):
                ns.addr("add", index=lo, address=f"{ip}/32")
            up0 = ns.link_lookup(ifname="up0")[0]
            ns.addr("add", index=up0, address=f"{self.upstream_ns_end}/30")
            if self.plan.ipv6:
                ns.addr("add", index=lo, address=UPSTREAM_IP6, prefixlen=128, IFA_FLAGS=_NODAD)
                ns.addr("add", index=up0, address=self.upstream6[1], prefixlen=127,
                        IFA_FLAGS=_NODAD)
            ns.link("set", index=up0, state="up")
            # no default route: the upstream namespace can only answer (replies go to the
            # host's veth address, which is on-link), never send anywhere else
        # servers bound to the wildcard (iperf3 UDP) reply from the route's source
        # address: make that the "public" one, as a real server's would be
        subprocess.run(["ip", "-n", self.upstream_ns, "route", "replace",
                        f"{self.upstream_host_end - 1}/30", "dev", "up0", "src", UPSTREAM_IP],
                       check=True, capture_output=True, timeout=30)
        self.servers = subprocess.Popen(
            ["ip", "netns", "exec", self.upstream_ns, sys.executable, "-m",
             "tests.netstack_gateway.upstream_servers", "--ip", UPSTREAM_IP,
             "--dns-ip", UPSTREAM_DNS_IP, "--cert", str(cert_file), "--key", str(key_file),
             *(["--ip6", UPSTREAM_IP6] if self.plan.ipv6 else [])],
            cwd=_REPO, stdout=subprocess.PIPE, text=True)
        assert self.servers.stdout is not None
        line = self.servers.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"upstream servers did not start (got {line!r})")

    # -- helpers -------------------------------------------------------------------
    def run_in_guest(self, argv: list[str], timeout: float = 30
                     ) -> subprocess.CompletedProcess[str]:
        """Run a command in the guest namespace (stdout/stderr captured)."""
        return subprocess.run(["ip", "netns", "exec", self.guest_ns, *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def detach_vmm(self) -> tuple[socket.socket, int]:
        """Stop the Python fake VMM and hand out its ends: ``(VMM socket, guest TAP fd)``.

        For a faster frame mover (the benchmark's C pump); both stay owned by the
        topology and are closed by :meth:`close`.
        """
        if self.vmm is not None:
            self.vmm.stop()
            self.vmm = None
        assert self._vmm_end is not None and self._guest_tap_fd is not None
        return self._vmm_end, self._guest_tap_fd

    def close(self) -> None:
        """Stop everything and delete the namespaces and links (idempotent)."""
        if self.vmm is not None:
            self.vmm.stop()
            self.vmm = None
        for s in (self.vmm_socket, self._vmm_end):
            if s is not None:
                s.close()
        self.vmm_socket = self._vmm_end = None
        if self._guest_tap_fd is not None:
            os.close(self._guest_tap_fd)
            self._guest_tap_fd = None
        if self.servers is not None:
            self.servers.kill()
            self.servers.wait(10)
            if self.servers.stdout:
                self.servers.stdout.close()
            self.servers = None
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.upstream_veth)
            if idx:
                ipr.link("del", index=idx[0])
        existing = netns.listnetns()
        for name in (self.guest_ns, self.upstream_ns):
            if name in existing:
                netns.remove(name)

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def host_loopback_http() -> Iterator[int]:
    """An HTTP service on the host's 127.0.0.1 (what the ``host`` group reaches); yields its port."""

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello from the host loopback\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def topology_token(suffix: str) -> str:
    """The :class:`Topology` token of this process's rig ``suffix``."""
    return f"{os.getpid() % 0xFFFF:04x}{suffix}"


@contextmanager
def uplink_and_topology(name: str, plan: AddressPlan, tmp: Path, token_suffix: str, *,
                        upstream: bool = True, mode: str = "stream", vfkit: bool = False,
                        kind: str = "tap", **uplink_kw: bool
                        ) -> Iterator[tuple[TapUplink | PasstUplink, Topology]]:
    """A :class:`~netstack.gateway.TapUplink` (state under ``tmp/home``; ``kind="passt"``: a
    :class:`~netstack.gateway.PasstUplink`, whose passt leaves the upstream through the host's
    routes like the TAP uplink's NAT) and a :class:`Topology` for one test rig. Both are
    removed afterwards (also on errors), stale records are cleaned, and the host's
    namespaces, links and nft tables of ours must then be exactly as before (and no
    passt process of the rig may be left)."""
    tokens = (uplink_names(name)["token"], topology_token(token_suffix))

    def mine() -> dict[str, set[str]]:  # objects of other processes' rigs do not count
        return {k: {n for n in v if any(t in n for t in tokens)}
                for k, v in snapshot().ours().items()}

    before = mine()
    home = tmp / "home"
    uplink: TapUplink | PasstUplink | None = None
    topo = None
    try:
        if kind == "passt":
            uplink = PasstUplink(plan, host_loopback=bool(uplink_kw.get("host_loopback")))
        else:
            uplink = TapUplink(name, plan, home=home, **uplink_kw)
        topo = Topology(plan, tmp, token=topology_token(token_suffix), upstream=upstream,
                        mode=mode, vfkit=vfkit)
        yield uplink, topo
    finally:
        if topo is not None:
            topo.close()
        if uplink is not None:
            uplink.close()
            if isinstance(uplink, PasstUplink):
                assert not Path(f"/proc/{uplink.pid}").exists(), "passt left running"
        cleanup_stale(home)
        assert mine() == before
