"""``python -m netstack serve``: the policy-enforcing gateway alone, for any VMM.

The VMM's network device is connected to a socket (or TAP) this process serves; every
frame goes through the same C loop as a sandbox's (policy, DNS forwarder, SNI checks,
RST/ICMP for denied flows), then out through the uplink (``tap``: netns + TAP + NAT,
root; ``passt``: Debian's passt, any user). Transports:

* ``stream``: a unix stream socket at ``--socket``; the VMM connects and frames carry a
  u32 big-endian length (QEMU ``-netdev stream,server=off``, libkrun
  ``krun_add_net_unixstream``);
* ``dgram``: a unix datagram socket at ``--socket``; the VMM binds its own address and
  sends one frame per datagram, the first one may be libkrun's/vfkit's ``VFKT``
  handshake (libkrun unixgram); the gateway then talks to the address it came from;
* ``tap``: ``--socket`` names a TAP device this process creates (persistent, for the VMM
  to open by name, as Firecracker does); the gateway sits on its host side through a
  second TAP joined to it by ``tc mirred`` in both directions. Root only.

Once listening, one JSON line goes to stdout: the guest configuration (addresses,
gateway, DNS, MTU, MAC), the socket, the transport and the published ports. ``SIGHUP``
re-reads the policy file and swaps it in atomically (:meth:`netstack.gateway.Gateway.reload`;
a bad file is logged and the old policy kept); ``SIGTERM``/``SIGINT`` or the VMM hanging
up end the process, after which everything it created is gone.

>>> ServeOptions("/tmp/n.sock", "p.json").transport
'stream'

Command line (click): ``python -m netstack serve --socket PATH --policy FILE [--uplink
tap|passt] [--transport stream|dgram|tap] [--pcap FILE] [--publish HOST:GUEST[/udp]]...
[--dns RESOLVER]... [--mtu N]``; ``--help`` shows an example.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from netstack._policy import NetworkPolicy
from netstack.errors import GatewayError, PolicyError, UplinkError
from netstack.gateway import (
    SANDBOX_GUEST_MTU,
    AddressPlan,
    Gateway,
    PasstUplink,
    PublishedPort,
    TapUplink,
    Uplink,
    allocate_slot,
)

log = logging.getLogger("netstack.serve")

TRANSPORTS = ("stream", "dgram", "tap")
UPLINKS = ("tap", "passt")
_TUNSETIFF, _TUNSETPERSIST = 0x400454CA, 0x400454CB
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000


def load_policy(path: str | os.PathLike[str]) -> NetworkPolicy:
    """Read a :class:`~netstack.NetworkPolicy` from a JSON file (``NetworkPolicy.to_dict``'s
    format).

    >>> import json, tempfile
    >>> f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    >>> _ = f.write(json.dumps(NetworkPolicy.public_only().to_dict())); f.close()
    >>> load_policy(f.name).default_egress
    'deny'
    >>> load_policy("/nonexistent.json")
    Traceback (most recent call last):
    ...
    netstack.errors.PolicyError: cannot read the policy file '/nonexistent.json': No such file or directory
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PolicyError(f"cannot read the policy file {os.fspath(path)!r}: "
                          f"{e.strerror or e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise PolicyError(f"the policy file {os.fspath(path)!r} is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise PolicyError(f"the policy file {os.fspath(path)!r} must hold a JSON object, got "
                          f"{type(data).__name__}")
    return NetworkPolicy.from_dict(data)


@dataclass
class ServeOptions:
    """What ``python -m netstack serve`` was asked for (checked by :meth:`check`).

    >>> ServeOptions("/tmp/n.sock", "p.json", transport="udp").check()
    Traceback (most recent call last):
    ...
    netstack.errors.GatewayError: --transport must be one of stream, dgram, tap, got 'udp'
    """

    socket: str
    policy: str
    uplink: str = "auto"
    transport: str = "stream"
    pcap: str | None = None
    publish: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    mtu: int | None = None

    def check(self) -> tuple[NetworkPolicy, list[PublishedPort], str]:
        """Validate everything before any slow work; returns (policy, ports, uplink kind).

        >>> ServeOptions("/tmp/n.sock", "p.json", publish=["0:80"], uplink="passt").check()
        Traceback (most recent call last):
        ...
        netstack.errors.GatewayError: --publish needs a fixed host port, got '0:80'
        """
        if self.transport not in TRANSPORTS:
            raise GatewayError(f"--transport must be one of {', '.join(TRANSPORTS)}, got "
                               f"{self.transport!r}")
        if self.uplink not in (*UPLINKS, "auto"):
            raise GatewayError(f"--uplink must be tap or passt, got {self.uplink!r}")
        if not self.socket:
            raise GatewayError("--socket must name a unix socket path (a TAP name with "
                               "--transport tap), got ''")
        if self.transport == "tap" and (len(self.socket) > 12 or "/" in self.socket):
            raise GatewayError(f"with --transport tap, --socket names the VMM's TAP device "
                               f"(at most 12 characters, no '/'), got {self.socket!r}")
        if self.mtu is not None and not 576 <= self.mtu <= SANDBOX_GUEST_MTU:
            raise GatewayError(f"--mtu must be in 576..{SANDBOX_GUEST_MTU}, got {self.mtu}")
        ports = []
        for spec in self.publish:
            port = PublishedPort.parse(spec)
            if port.host_port == 0:
                raise GatewayError(f"--publish needs a fixed host port, got {spec!r}")
            ports.append(port)
        kind = self.uplink
        if kind == "auto":
            kind = "tap" if os.geteuid() == 0 and os.path.exists("/dev/net/tun") else "passt"
        if (kind == "tap" or self.transport == "tap") and os.geteuid() != 0:
            raise GatewayError(f"--uplink {kind} --transport {self.transport} needs root; "
                               f"without root use --uplink passt with stream or dgram")
        return load_policy(self.policy), ports, kind


def _open_tap(name: str, persist: bool) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
        if persist:
            fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    except OSError:
        os.close(fd)
        raise
    return fd


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise GatewayError(f"{' '.join(argv)} failed: {r.stderr.strip()}")


class TapPair:
    """The VMM's TAP ``name`` (persistent, opened by the VMM by name) joined by ``tc
    mirred`` both ways to a TAP whose fd the gateway reads (``transport="tap"``).

    >>> with TapPair("fc-tap0", mtu=1500) as pair:          # doctest: +SKIP
    ...     Gateway(policy, uplink=up, guest_fd=pair.fd, transport="tap")
    """

    def __init__(self, name: str, mtu: int) -> None:
        self.name = name
        self.peer = f"{name}g"
        self.fd: int = -1
        self._vmm_fd = -1
        try:
            self._vmm_fd = _open_tap(name, persist=True)
            os.close(self._vmm_fd)
            self._vmm_fd = -1
            self.fd = _open_tap(self.peer, persist=False)
            for dev in (name, self.peer):
                _run("sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
                _run("ip", "link", "set", dev, "mtu", str(mtu), "up")
                _run("tc", "qdisc", "add", "dev", dev, "ingress")
            for src, dst in ((name, self.peer), (self.peer, name)):
                _run("tc", "filter", "add", "dev", src, "parent", "ffff:", "protocol", "all",
                     "u32", "match", "u32", "0", "0",
                     "action", "mirred", "egress", "redirect", "dev", dst)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Delete both TAPs (idempotent).

        >>> pair.close()                                        # doctest: +SKIP
        """
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        subprocess.run(["ip", "link", "del", self.name], capture_output=True, check=False)

    def __enter__(self) -> TapPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accept_guest(opts: ServeOptions, listener: socket.socket,
                  stop: threading.Event) -> socket.socket | None:
    """Wait for the VMM: a stream connection, or the first datagram (``VFKT`` or a frame)
    whose sender becomes the connected peer."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            if opts.transport == "stream":
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            data, peer = listener.recvfrom(65536)
        except TimeoutError:
            continue
        if not peer:
            log.warning("serve: a datagram from an unbound socket ignored (the VMM must "
                        "bind its own address)")
            continue
        listener.settimeout(None)
        listener.connect(peer)
        if data != b"VFKT":
            log.info("serve: first datagram was a frame, not VFKT (dropped)")
        return listener
    return None


def serve(opts: ServeOptions, out: IO[str] = sys.stdout,
          stop: threading.Event | None = None) -> int:
    """Run the gateway for one VMM until ``stop``, SIGTERM/SIGINT or the VMM hangs up.

    >>> serve(ServeOptions("/tmp/x.sock", "/nonexistent.json", uplink="passt"))
    Traceback (most recent call last):
    ...
    netstack.errors.PolicyError: cannot read the policy file '/nonexistent.json': No such file or directory
    """
    policy, ports, kind = opts.check()
    stop = stop or threading.Event()
    reload_wanted = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    old: dict[signal.Signals, Any] = {}
    if in_main:
        def on_stop(signum: int, frame: object) -> None:
            stop.set()

        def on_hup(signum: int, frame: object) -> None:
            reload_wanted.set()

        for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop),
                             (signal.SIGHUP, on_hup)):
            old[sig] = signal.signal(sig, handler)
    cleanups: list[Callable[[], None]] = []
    try:
        mtu = opts.mtu or (1500 if opts.transport == "tap" else SANDBOX_GUEST_MTU)
        uplink: Uplink
        for _ in range(64):
            # kernel objects are host-wide, slot leases per home: skip a slot in use
            lease = allocate_slot()
            cleanups.append(lease.release)
            plan = AddressPlan(lease.slot, mtu=mtu)
            try:
                if kind == "passt":
                    uplink = PasstUplink(plan, published_ports=ports)
                else:
                    uplink = TapUplink(f"serve{lease.slot}", plan, vnet_hdr=True)
                break
            except UplinkError as e:
                if "already has an uplink" not in str(e):
                    raise
        else:
            raise GatewayError("no free network slot: 64 slots in a row are in use")
        cleanups.append(uplink.close)
        listener: socket.socket | None = None
        pair: TapPair | None = None
        if opts.transport == "tap":
            pair = TapPair(opts.socket, plan.mtu)
            cleanups.append(pair.close)
        else:
            kind_ = socket.SOCK_STREAM if opts.transport == "stream" else socket.SOCK_DGRAM
            listener = socket.socket(socket.AF_UNIX, kind_)
            cleanups.append(listener.close)
            path = Path(opts.socket)
            if path.is_socket():
                path.unlink()
            listener.bind(str(path))
            cleanups.append(lambda: path.unlink(missing_ok=True))
            if kind_ == socket.SOCK_STREAM:
                listener.listen(1)
        info = {"socket": opts.socket, "transport": opts.transport, "uplink": kind,
                "pid": os.getpid(), "guest": plan.guest_config(),
                "published": {f"{p.protocol}:{p.guest_port}": p.host_port for p in ports}}
        out.write(json.dumps(info) + "\n")
        out.flush()
        if listener is not None:
            conn = _accept_guest(opts, listener, stop)
            if conn is None:
                return 0
            if conn is not listener:
                listener.close()
            gw = Gateway(policy, uplink=uplink, guest_socket=conn,
                         transport="stream" if opts.transport == "stream" else "dgram",
                         pcap=opts.pcap, dns_upstreams=opts.dns or None,
                         published_ports=ports if kind == "tap" else (), own_uplink=True)
        else:
            assert pair is not None
            gw = Gateway(policy, uplink=uplink, guest_fd=pair.fd, transport="tap",
                         pcap=opts.pcap, dns_upstreams=opts.dns or None,
                         published_ports=ports if kind == "tap" else (), own_uplink=True)
        cleanups.append(gw.close)
        log.info("serve: gateway up (%s over %s, %s uplink)", opts.socket, opts.transport, kind)
        while not stop.wait(0.2):
            if reload_wanted.is_set():
                reload_wanted.clear()
                try:
                    gw.reload(load_policy(opts.policy))
                    print("netstack serve: policy reloaded", file=sys.stderr, flush=True)
                except PolicyError as e:
                    print(f"netstack serve: policy NOT reloaded (kept the old one): {e}",
                          file=sys.stderr, flush=True)
            if gw.guest_closed:
                break
        return 0
    finally:
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception as e:  # pragma: no cover - best effort at exit
                log.warning("serve: cleanup failed: %s", e)
        for sig, previous in old.items():
            signal.signal(sig, previous)


def dns_query_frame(guest: dict[str, Any], name: str, txid: int = 0x4242) -> bytes:
    """The Ethernet frame of a guest's UDP DNS query for ``name`` (A) to its gateway
    (``guest``: the ``"guest"`` entry ``serve`` printed), for VMM stand-ins and tests.

    >>> from netstack.gateway import AddressPlan
    >>> frame = dns_query_frame(AddressPlan(3).guest_config(), "example.com")
    >>> frame[12:14], len(frame) > 42
    (b'\\x08\\x00', True)
    """
    import dns.message

    from netstack._frameinfo import build_frame

    query = dns.message.make_query(name, "A")
    query.id = txid
    frame = build_frame(guest["ipv4"]["address"], guest["ipv4"]["gateway"], "udp", 40000, 53,
                        query.to_wire())
    mac = bytes(int(x, 16) for x in guest["mac"].split(":"))
    return b"\xff" * 6 + mac + frame[12:]


def dns_rcode(frame: bytes) -> str | None:
    """The DNS response code of an IPv4 UDP frame from port 53 (None: not a DNS answer).

    >>> dns_rcode(b"junk") is None
    True
    """
    import dns.exception
    import dns.message
    import dns.rcode

    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    off = 14 + (frame[14] & 0x0F) * 4
    if frame[off:off + 2] != b"\x00\x35":
        return None
    try:
        return str(dns.rcode.to_text(dns.message.from_wire(frame[off + 8:]).rcode()))
    except dns.exception.DNSException:
        return None


_SERVE_EPILOG = """\b
Example:
  python -m netstack serve --socket net.sock --policy policy.json \\
      --uplink passt --publish 8080:80 > guest.json &
  qemu-system-x86_64 ... -netdev stream,id=n0,server=off,addr.type=unix,\\
      addr.path=net.sock -device virtio-net-pci,netdev=n0,mac=<guest.json's mac>
"""


@click.group(name="netstack", epilog=_SERVE_EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """netstack's command line: serve runs the policy-enforcing gateway for one VMM."""


@cli.command("serve", epilog=_SERVE_EPILOG)
@click.option("--socket", "socket_", required=True, metavar="PATH",
              help="unix socket path the VMM connects to (with --transport tap: the "
                   "TAP device name the VMM opens)")
@click.option("--policy", required=True, metavar="FILE",
              help="NetworkPolicy JSON file (SIGHUP re-reads it)")
@click.option("--uplink", default="auto", show_default=True, metavar="tap|passt",
              help="tap (root) or passt (auto: tap as root, else passt)")
@click.option("--transport", default="stream", show_default=True,
              metavar="stream|dgram|tap", help="how the VMM's network device reaches us")
@click.option("--pcap", default=None, metavar="FILE",
              help="record every frame with its verdict here (pcapng)")
@click.option("--publish", multiple=True, metavar="HOST:GUEST[/udp]",
              help="publish a guest port on the host's 127.0.0.1 (repeatable)")
@click.option("--dns", multiple=True, metavar="RESOLVER",
              help="upstream resolver of the DNS forwarder (repeatable; default: "
                   "resolv.conf)")
@click.option("--mtu", type=int, default=None,
              help="guest link MTU (default 65520, 1500 with --transport tap)")
def serve_command(socket_: str, policy: str, uplink: str, transport: str, pcap: str | None,
                  publish: tuple[str, ...], dns: tuple[str, ...], mtu: int | None) -> int:
    """Run the policy-enforcing gateway for one VMM's network device until SIGTERM/SIGINT
    or the VMM hangs up; prints the guest configuration as one JSON line.
    """
    opts = ServeOptions(socket=socket_, policy=policy, uplink=uplink, transport=transport,
                        pcap=pcap, publish=list(publish), dns=list(dns), mtu=mtu)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    return serve(opts)


def _one_line(text: str) -> str:
    return "; ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m netstack``: returns the exit status; a bad argument or
    policy is one line on stderr and exit status 2 (no traceback).

    >>> main(["serve", "--socket", "s", "--policy", "/nonexistent.json", "--uplink", "x"])
    2
    >>> main(["serve", "--socket", "s"])
    2
    """
    try:
        rv = cli.main(args=list(argv) if argv is not None else None,
                      prog_name="python -m netstack", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        return 2
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print(f"netstack serve: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        return 130
    except (GatewayError, PolicyError) as e:
        print(f"netstack serve: {_one_line(str(e))}", file=sys.stderr)
        return 2
    return rv if isinstance(rv, int) else 0
