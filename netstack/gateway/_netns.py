"""Entering a named network namespace from one thread, briefly: the one way netstack does it.

A socket keeps the network namespace it was created in, and ``/proc/sys/net`` shows the
namespace of the thread that opens it; so both only need the *calling thread* inside
the namespace for a moment (``setns(2)`` through pyroute2, then back). Used by
:meth:`TapUplink.socket <netstack.gateway.TapUplink.socket>` (listeners and connections
in the uplink namespace: DNS over TCP, the TLS proxy, published ports) and for the
namespace's sysctls (instead of ``ip netns exec NS sysctl``).

Unlike ``pyroute2.netns.pushns(name)``, :func:`entered` never creates a namespace that
is missing (it raises :class:`~netstack.errors.UplinkError`), returns to the namespace
of the calling *thread* (``/proc/thread-self``, not the main thread's) and keeps no
process-global stack, so threads may use it at the same time.

>>> import socket
>>> try:
...     socket_in("no-such-netns", socket.AF_INET, socket.SOCK_STREAM)
... except Exception as e:
...     print(type(e).__name__)
UplinkError
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from netstack.errors import UplinkError

#: where ``ip netns add`` (and pyroute2) keep named namespaces
NETNS_RUN_DIR: Final = Path("/run/netns")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SYSCTL_KEY = re.compile(r"^net(/[A-Za-z0-9_.-]+)+$")


def _setns(fd: int) -> None:
    from pyroute2.netns import setns

    setns(fd)   # an fd: pyroute2 only calls setns(2), it creates nothing


@contextmanager
def entered(name: str) -> Iterator[None]:
    """The body runs with the calling thread in network namespace ``name`` (from
    :data:`NETNS_RUN_DIR`); the thread returns to its own namespace whatever happens.
    The body must not wait for other threads or an event loop (it holds the thread).

    >>> with entered("no-such-netns"):
    ...     pass
    Traceback (most recent call last):
    ...
    netstack.errors.UplinkError: network namespace 'no-such-netns' does not exist (no /run/netns/no-such-netns)
    """
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise UplinkError(f"network namespace name must be 1..64 letters, digits, '_', "
                          f"'.', '-', got {name!r}")
    path = NETNS_RUN_DIR / name
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UplinkError(f"network namespace {name!r} does not exist (no {path})") from None
    except OSError as e:
        raise UplinkError(f"cannot open network namespace {name!r}: {e}") from e
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target)
            except OSError as e:
                raise UplinkError(f"cannot enter network namespace {name!r}: {e}") from e
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


def socket_in(name: str, family: int, kind: int) -> socket.socket:
    """A new socket that lives in network namespace ``name``.

    >>> socket_in("../x", socket.AF_INET, socket.SOCK_STREAM)
    Traceback (most recent call last):
    ...
    netstack.errors.UplinkError: network namespace name must be 1..64 letters, digits, '_', '.', '-', got '../x'
    """
    with entered(name):
        return socket.socket(family, kind)


def write_sysctls(name: str, values: Mapping[str, str | int]) -> None:
    """Set ``net/...`` sysctls (keys are ``/proc/sys`` paths, e.g.
    ``"net/ipv4/ip_forward"``: an interface name may hold dots) in namespace ``name``.

    >>> write_sysctls("no-such-netns", {"net.ipv4.ip_forward": 1})
    Traceback (most recent call last):
    ...
    netstack.errors.UplinkError: sysctl key must be a /proc/sys path under net/ (net/ipv4/ip_forward), got 'net.ipv4.ip_forward'
    """
    for key in values:
        if not isinstance(key, str) or not _SYSCTL_KEY.match(key) or "/../" in f"{key}/" \
                or "/./" in f"{key}/":
            raise UplinkError(f"sysctl key must be a /proc/sys path under net/ "
                              f"(net/ipv4/ip_forward), got {key!r}")
    with entered(name):
        for key, value in values.items():
            try:
                (Path("/proc/sys") / key).write_text(f"{value}\n", encoding="ascii")
            except OSError as e:
                raise UplinkError(f"cannot set sysctl {key.replace('/', '.')}={value} in "
                                  f"network namespace {name!r}: {e}") from e
