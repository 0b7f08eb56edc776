"""The DNS pin cache (in C): which hostnames an IP was resolved from.

Semantics (reference microsandbox §2.3):

* key = (hostname, address family) -> a set of IPs with one expiry per key.  A
  new answer **replaces** the key's set; an answer without addresses (NOERROR
  /NODATA) or with an error RCODE **clears** it.  A and AAAA refresh
  independently.  Only responses to A/AAAA questions are learned; truncated
  (TC) responses are ignored.
* The CNAME chain is followed from the question name; addresses owned by the
  name or any CNAME target reachable from it are pinned **to the question
  name** (the name the guest asked for).  Unrelated records are ignored.
* TTL = min over the contributing CNAME/A/AAAA TTLs, floored at 1 s and capped
  at ``ttl_ceiling`` (default 3600 s).  An entry is alive while
  ``expires_at > now``; expired ones are dropped lazily and by :meth:`expire`.
* Size bound: at most ``max_bindings`` (name, IP) pairs.  When an insert finds
  the cache full it examines 16 names from a rotating cursor and evicts the
  first expired one, else the one expiring soonest (never the name being
  written); eviction drops the whole name.  At most 64 IPs per name are kept,
  and a flow sees at most 64 names per IP (most recently pinned first).
* Thread-safe: the C cache has its own mutex, so a DNS forwarder may learn
  while the packet loop looks names up.

>>> import dns.message, dns.rrset
>>> from netstack import PinCache
>>> answer = dns.message.make_response(dns.message.make_query("WWW.Example.com", "A"))
>>> answer.answer += [
...     dns.rrset.from_text("WWW.Example.com.", 300, "IN", "CNAME", "cdn.example.net."),
...     dns.rrset.from_text("cdn.example.net.", 20, "IN", "A", "192.0.2.10")]
>>> pins = PinCache()
>>> pins.learn(answer.to_wire(), now=100.0)
1
>>> sorted(pins.names("192.0.2.10", now=119.0)), sorted(pins.names("192.0.2.10", now=120.0))
(['www.example.com'], [])
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from netstack._addresses import AddressLike, normalize_ip
from netstack._fastpath import ffi, lib
from netstack._ipbytes import ip16
from netstack._names import normalize_domain
from netstack.errors import FastPathError, MalformedDNS


class PinCache:
    """IP -> hostnames learned from DNS answers, with TTLs (see the module docs).

    >>> pins = PinCache(max_bindings=1000, ttl_ceiling=60)
    >>> pins.pin("api.example.com", ["192.0.2.1", "2001:db8::1"], ttl=3600, now=0.0)
    2
    >>> pins.names("192.0.2.1", now=59.0), pins.names("192.0.2.1", now=61.0)
    (frozenset({'api.example.com'}), frozenset())
    """

    def __init__(self, max_bindings: int = 65536, ttl_ceiling: float = 3600.0) -> None:
        if isinstance(max_bindings, bool) or not isinstance(max_bindings, int) or not (
                1 <= max_bindings <= 1 << 24):
            raise FastPathError(f"max_bindings must be an integer 1..16777216, got {max_bindings!r}")
        if not isinstance(ttl_ceiling, int | float) or not ttl_ceiling >= 1:
            raise FastPathError(f"ttl_ceiling must be a number of seconds >= 1, got {ttl_ceiling!r}")
        ptr = lib.ns_pin_new(max_bindings, float(ttl_ceiling))
        if ptr == ffi.NULL:
            raise FastPathError(f"out of memory allocating a pin cache of {max_bindings} bindings")
        self._ptr = ffi.gc(ptr, lib.ns_pin_free)
        self.max_bindings = max_bindings
        self.ttl_ceiling = float(ttl_ceiling)

    @property
    def handle(self) -> object:
        """The C ``ns_pincache *`` (for a Classifier or a C gateway loop).

        Keep this object alive while C code holds the pointer; the cache's own
        mutex makes concurrent use from several threads safe.

        >>> PinCache(16).handle is not None
        True
        """
        return self._ptr

    def learn(self, response: bytes | bytearray | memoryview, now: float | None = None) -> int:
        """Learn from a raw upstream DNS response; returns how many IPs were pinned.

        Returns 0 when the answer cleared the name (error RCODE or no address) or
        was not an A/AAAA answer.  Raises :class:`~netstack.MalformedDNS` for a
        malformed message.

        >>> import dns.message, dns.rrset
        >>> answer = dns.message.make_response(dns.message.make_query("a.test", "A"))
        >>> answer.answer.append(dns.rrset.from_text("a.test.", 5, "IN", "A", "192.0.2.1"))
        >>> PinCache().learn(answer.to_wire())
        1
        """
        data = ffi.from_buffer("uint8_t[]", response)
        rc = lib.ns_pin_learn_dns(self._ptr, data, len(data), _now(now))
        if rc == -1:
            raise MalformedDNS(f"malformed DNS response ({len(data)} bytes)")
        return max(int(rc), 0)

    def pin(self, name: str, addresses: Iterable[AddressLike], ttl: float,
            now: float | None = None) -> int:
        """Replace the pinned addresses of ``name`` (per family present in ``addresses``).

        An empty ``addresses`` clears both families of the name.  Returns the
        number of bindings written.

        >>> PinCache().pin("Example.COM.", ["192.0.2.5"], ttl=0.2)  # TTL floored to 1 s
        1
        """
        canon = normalize_domain(name).encode("ascii")
        ips = [normalize_ip(a) for a in addresses]
        t = _now(now)
        total = 0
        for family in (4, 6):
            fam = [ip16(a) for a in ips if a.version == family]
            if not fam and ips:
                continue
            blob = b"".join(fam)
            rc = lib.ns_pin_set(self._ptr, canon, len(canon), family, blob, len(fam),
                                float(ttl), t)
            if rc < 0:
                raise FastPathError(f"could not pin {name!r}: out of memory")
            total += rc
        return total

    def names(self, ip: AddressLike, now: float | None = None) -> frozenset[str]:
        """The hostnames currently pinned to ``ip`` (at most 64).

        >>> PinCache().names("192.0.2.1")
        frozenset()
        """
        blob = ffi.new("uint8_t[]", 64 * 256)
        lens = ffi.new("uint16_t[]", 64)
        n = lib.ns_pin_lookup(self._ptr, ip16(ip), _now(now), blob, 64 * 256, lens, 64)
        out: list[str] = []
        off = 0
        for i in range(n):
            out.append(bytes(ffi.buffer(blob + off, lens[i])).decode("ascii"))
            off += lens[i]
        return frozenset(out)

    def expire(self, now: float | None = None) -> None:
        """Drop every expired name now (lookups already ignore them).

        >>> PinCache().expire()
        """
        lib.ns_pin_expire(self._ptr, _now(now))

    @property
    def evictions(self) -> int:
        """How many names were evicted because the cache was full.

        >>> PinCache().evictions
        0
        """
        return int(lib.ns_pin_evictions(self._ptr))

    @property
    def max_chain(self) -> int:
        """The longest hash chain a lookup or insert has walked (entries examined).

        Names and IPs are hashed with SipHash-1-3 under a secret drawn per cache, so
        a guest (or a DNS server it controls) cannot pile names or addresses into one
        chain; this stays a small number.

        >>> pins = PinCache(16)
        >>> pins.pin("a.test", ["192.0.2.1"], ttl=60, now=0.0)
        1
        >>> pins.max_chain <= 2
        True
        """
        return int(lib.ns_pin_max_chain(self._ptr))

    def __len__(self) -> int:
        """Number of (name, IP) bindings held (expired ones included until dropped)."""
        return int(lib.ns_pin_count(self._ptr))


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else float(now)
