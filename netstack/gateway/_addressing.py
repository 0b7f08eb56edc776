"""Per-sandbox address plan and slot allocation.

Each sandbox owns a *slot* (0..65535). The slot fixes everything about its
addressing (reference: microsandbox ``network.rs``):

* IPv4: one /30 in ``172.16.0.0/12`` per slot; guest = base + 4*slot + 2,
  gateway = guest - 1, DNS = gateway, prefix 30.
* MACs: guest ``02:6d:73:SS:SS:02``, gateway ``02:6d:73:SS:SS:01`` (SS:SS = slot,
  big-endian).
* IPv6 (optional): one /64 in ``fd42:6d73:62::/48`` per slot (slot << 64);
  guest ``...::2``, gateway ``...::1``.
* the guest link's MTU, by default :data:`SANDBOX_GUEST_MTU` (65520: large guest TCP
  frames, which the gateway sends on as GSO packets; chosen by measurement, see
  ``benchmarks/gateway.py``), and a host alias name that resolves to the gateway.

Slots are handed out by :func:`allocate_slot`, which holds an exclusive
``flock`` on ``$MICROVM_HOME/net/slots/<slot>.lock`` for as long as the lease
lives: two processes never get the same slot, and the kernel releases the lock
when a process dies, so a crash never leaks a slot.

>>> plan = AddressPlan(3)
>>> str(plan.guest_ipv4), str(plan.gateway_ipv4), plan.guest_mac
('172.16.0.14', '172.16.0.13', '02:6d:73:00:03:02')
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from netstack.errors import AddressPlanError

#: Highest slot number (MAC and IPv6 encode 16 bits).
MAX_SLOT: Final = 65535
#: Pool the per-slot IPv4 /30s are carved from.
IPV4_POOL: Final = ipaddress.IPv4Network("172.16.0.0/12")
#: Pool the per-slot IPv6 /64s are carved from.
IPV6_POOL: Final = ipaddress.IPv6Network("fd42:6d73:62::/48")
#: Default name the guest can use to reach the gateway (the ``host`` group).
DEFAULT_HOST_ALIAS: Final = "host.microvm.internal"
#: The guest link MTU a sandbox gets: 65520 (passt's and QEMU's largest virtio-net
#: MTU). The guest then sends TCP segments of up to 64 KiB, which the gateway hands to a
#: ``vnet_hdr`` uplink as GSO packets cut to the uplink's MSS: ``python -m
#: benchmarks.gateway --quick`` measured 0.62-0.75 of the direct veth's TCP throughput at
#: 65520 against 0.42-0.51 at 1500 (the gateway loop is CPU-bound per frame). Other
#: packets larger than the uplink's 1500 are fragmented (IPv4 without DF) or answered
#: with ICMP "fragmentation needed" / "packet too big" by the gateway.
SANDBOX_GUEST_MTU: Final = 65520
#: Default guest interface MTU (:data:`SANDBOX_GUEST_MTU`).
DEFAULT_MTU: Final = SANDBOX_GUEST_MTU


def microvm_home() -> Path:
    """The state directory: ``$MICROVM_HOME`` or ``~/.microvm``.

    >>> microvm_home().name in (".microvm",) or "MICROVM_HOME" in __import__("os").environ
    True
    """
    env = os.environ.get("MICROVM_HOME")
    return Path(env) if env else Path.home() / ".microvm"


def _check_slot(slot: object) -> int:
    if isinstance(slot, bool) or not isinstance(slot, int):
        raise AddressPlanError(f"slot must be an int in 0..{MAX_SLOT}, got {slot!r}")
    if not 0 <= slot <= MAX_SLOT:
        raise AddressPlanError(f"slot {slot} is out of range 0..{MAX_SLOT}")
    return slot


@dataclass(frozen=True)
class AddressPlan:
    """The addresses, MACs and MTU of one sandbox slot.

    ``ipv6=True`` adds the slot's ULA /64. ``mtu`` must be 576..65520 (default
    :data:`SANDBOX_GUEST_MTU`, 65520; above the uplink's 1500 the gateway needs a
    ``vnet_hdr`` uplink, the :class:`~netstack.gateway.TapUplink` default).

    >>> p = AddressPlan(0, ipv6=True)
    >>> p.guest_config()["ipv4"]
    {'address': '172.16.0.2', 'prefix_len': 30, 'gateway': '172.16.0.1', 'dns': ['172.16.0.1']}
    >>> str(p.guest_ipv6), str(p.gateway_ipv6)
    ('fd42:6d73:62::2', 'fd42:6d73:62::1')
    """

    slot: int
    ipv6: bool = False
    mtu: int = DEFAULT_MTU
    host_alias: str = DEFAULT_HOST_ALIAS
    interface: str = "eth0"

    def __post_init__(self) -> None:
        _check_slot(self.slot)
        if isinstance(self.mtu, bool) or not isinstance(self.mtu, int) \
                or not 576 <= self.mtu <= 65520:
            raise AddressPlanError(f"mtu must be an int in 576..65520, got {self.mtu!r}")
        alias = self.host_alias
        if not isinstance(alias, str) or not alias or len(alias) > 253 or alias.endswith(".") \
                or any(not lbl or len(lbl) > 63 for lbl in alias.split(".")):
            raise AddressPlanError(f"host_alias must be a domain name like "
                                   f"'host.microvm.internal', got {alias!r}")
        object.__setattr__(self, "host_alias", alias.lower())
        if not isinstance(self.interface, str) or not 0 < len(self.interface) < 16:
            raise AddressPlanError(f"interface must be a name of 1..15 characters, "
                                   f"got {self.interface!r}")

    # -- IPv4 ----------------------------------------------------------------------
    @property
    def network_ipv4(self) -> ipaddress.IPv4Network:
        """The slot's /30, e.g. ``172.16.0.0/30`` for slot 0.

        >>> str(AddressPlan(1).network_ipv4)
        '172.16.0.4/30'
        """
        base = int(IPV4_POOL.network_address) + 4 * self.slot
        return ipaddress.IPv4Network((base, 30))

    @property
    def guest_ipv4(self) -> ipaddress.IPv4Address:
        """The guest's address (base + 4*slot + 2).

        >>> str(AddressPlan(0).guest_ipv4)
        '172.16.0.2'
        """
        return self.network_ipv4.network_address + 2

    @property
    def gateway_ipv4(self) -> ipaddress.IPv4Address:
        """The gateway address (guest - 1); also the DNS server and the host alias.

        >>> str(AddressPlan(0).gateway_ipv4)
        '172.16.0.1'
        """
        return self.guest_ipv4 - 1

    # -- IPv6 ----------------------------------------------------------------------
    @property
    def network_ipv6(self) -> ipaddress.IPv6Network | None:
        """The slot's ULA /64, or None without IPv6.

        >>> str(AddressPlan(2, ipv6=True).network_ipv6)
        'fd42:6d73:62:2::/64'
        """
        if not self.ipv6:
            return None
        return ipaddress.IPv6Network((int(IPV6_POOL.network_address) + (self.slot << 64), 64))

    @property
    def guest_ipv6(self) -> ipaddress.IPv6Address | None:
        """The guest's IPv6 address (``...::2``), or None.

        >>> AddressPlan(0).guest_ipv6 is None
        True
        """
        net = self.network_ipv6
        return None if net is None else net.network_address + 2

    @property
    def gateway_ipv6(self) -> ipaddress.IPv6Address | None:
        """The gateway's IPv6 address (``...::1``), or None.

        >>> str(AddressPlan(0, ipv6=True).gateway_ipv6)
        'fd42:6d73:62::1'
        """
        net = self.network_ipv6
        return None if net is None else net.network_address + 1

    # -- link layer ----------------------------------------------------------------
    @property
    def guest_mac(self) -> str:
        """``02:6d:73:SS:SS:02``.

        >>> AddressPlan(0x1234).guest_mac
        '02:6d:73:12:34:02'
        """
        return f"02:6d:73:{self.slot >> 8:02x}:{self.slot & 0xFF:02x}:02"

    @property
    def gateway_mac(self) -> str:
        """``02:6d:73:SS:SS:01``.

        >>> AddressPlan(0x1234).gateway_mac
        '02:6d:73:12:34:01'
        """
        return f"02:6d:73:{self.slot >> 8:02x}:{self.slot & 0xFF:02x}:01"

    @property
    def gateway_addresses(self) -> tuple[str, ...]:
        """The gateway's addresses (v4, then v6 if enabled): the ``host`` group.

        >>> AddressPlan(0).gateway_addresses
        ('172.16.0.1',)
        """
        v6 = self.gateway_ipv6
        return (str(self.gateway_ipv4),) + ((str(v6),) if v6 is not None else ())

    def guest_config(self) -> dict[str, Any]:
        """What the guest agent's bootstrap needs to configure eth0, resolv.conf and /etc/hosts.

        The ``ipv6`` key is present only when IPv6 is enabled. ``hosts`` maps the host
        alias to the gateway's IPv4 address.

        >>> AddressPlan(0).guest_config()  # doctest: +NORMALIZE_WHITESPACE
        {'interface': 'eth0', 'mac': '02:6d:73:00:00:02', 'mtu': 65520,
         'ipv4': {'address': '172.16.0.2', 'prefix_len': 30, 'gateway': '172.16.0.1',
                  'dns': ['172.16.0.1']},
         'hosts': {'host.microvm.internal': '172.16.0.1'}}
        """
        gw4 = str(self.gateway_ipv4)
        cfg: dict[str, Any] = {
            "interface": self.interface,
            "mac": self.guest_mac,
            "mtu": self.mtu,
            "ipv4": {"address": str(self.guest_ipv4), "prefix_len": 30, "gateway": gw4,
                     "dns": [gw4]},
        }
        if self.ipv6:
            gw6 = str(self.gateway_ipv6)
            cfg["ipv6"] = {"address": str(self.guest_ipv6), "prefix_len": 64, "gateway": gw6,
                           "dns": [gw6]}
        cfg["hosts"] = {self.host_alias: gw4}
        return cfg


class SlotLease:
    """An exclusively held slot; release it with :meth:`release` (or ``with``).

    The lease is an open file with an ``flock`` on ``<home>/net/slots/<slot>.lock``;
    the kernel drops it if the process dies.

    >>> import tempfile
    >>> home = tempfile.mkdtemp()
    >>> with allocate_slot(home=home) as a, allocate_slot(home=home) as b:
    ...     (a.slot, b.slot)
    (0, 1)
    """

    def __init__(self, slot: int, fd: int, path: Path) -> None:
        self.slot = slot
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """True until :meth:`release`.

        >>> import tempfile
        >>> lease = allocate_slot(home=tempfile.mkdtemp()); lease.release(); lease.held
        False
        """
        return self._fd is not None

    def plan(self, **kwargs: Any) -> AddressPlan:
        """The :class:`AddressPlan` of this slot (keyword arguments as for AddressPlan).

        >>> import tempfile
        >>> with allocate_slot(home=tempfile.mkdtemp()) as lease:
        ...     str(lease.plan().guest_ipv4)
        '172.16.0.2'
        """
        return AddressPlan(self.slot, **kwargs)

    def release(self) -> None:
        """Give the slot back (idempotent).

        >>> import tempfile
        >>> lease = allocate_slot(home=tempfile.mkdtemp()); lease.release(); lease.release()
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> SlotLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"SlotLease(slot={self.slot}, held={self.held})"


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def allocate_slot(slot: int | None = None, *, home: str | os.PathLike[str] | None = None
                  ) -> SlotLease:
    """Lease the lowest free slot (or exactly ``slot``) under ``home``/net/slots.

    Raises :class:`~netstack.errors.AddressPlanError` if ``slot`` is taken or invalid,
    or if all 65536 slots are held.

    >>> import tempfile
    >>> home = tempfile.mkdtemp()
    >>> with allocate_slot(7, home=home) as lease:
    ...     allocate_slot(7, home=home)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    netstack.errors.AddressPlanError: slot 7 is already leased by another sandbox ...
    """
    root = (Path(home) if home is not None else microvm_home()) / "net" / "slots"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise AddressPlanError(f"cannot create the slot directory {str(root)!r}: {e}") from e
    if slot is not None:
        _check_slot(slot)
        path = root / f"{slot}.lock"
        fd = _try_lock(path)
        if fd is None:
            raise AddressPlanError(f"slot {slot} is already leased by another sandbox "
                                   f"(lock {str(path)!r})")
        return SlotLease(slot, fd, path)
    for candidate in range(MAX_SLOT + 1):
        path = root / f"{candidate}.lock"
        fd = _try_lock(path)
        if fd is not None:
            return SlotLease(candidate, fd, path)
    raise AddressPlanError(f"all {MAX_SLOT + 1} slots under {str(root)!r} are leased")
