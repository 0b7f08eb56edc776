"""The compiled policy + flow table of the C fast path: ``Classifier``.

``Classifier(policy, gateway=...)`` compiles a :class:`~netstack.NetworkPolicy`
into C tables and owns a flow table.  First-match order is preserved exactly
(see ``netstack/csrc/policy.c``): cidr rules are hashed by (prefix length,
network) - one probe per distinct prefix length; domain and suffix rules are
hashed by name - one probe per label of the SNI or pinned name; group rules
are bucketed by group; each candidate list is scanned only below the best
index found so far.  Lookup cost therefore does not grow with the rule count.

Why C parsers of our own (``netstack/csrc``: frames, fragments, DNS, ClientHello) and
not dpkt/scapy/dnspython on the packet path: every frame a guest sends passes them, so
they must run without allocations or Python objects per packet (measured: 169x dpkt's
parse-and-match rate, ``python -m benchmarks.netstack``), with bounds-checked reads and
keyed hashing because the guest is hostile; each has a libFuzzer/atheris target under
ASan (tests/fuzz). dnspython is used where speed does not matter (the DNS forwarder).

* A flow is keyed by direction, IP protocol, addresses and ports.  It is
  evaluated once (its first frame); later frames cost a hash lookup.
* **Idle expiry**: a flow unseen for ``tcp_idle`` (TCP) or ``udp_idle`` (UDP,
  ICMP) seconds is re-evaluated on its next frame; :meth:`expire` drops them.
* **Eviction**: the table holds at most ``max_flows`` flows.  Inserting into a
  full table examines the next 16 flows from a rotating cursor and evicts the
  first idle-expired one, else the least recently seen of those 16.
* **Recompiling** (:meth:`recompile`) swaps the tables atomically: a batch
  running in another thread keeps the tables it started with, and each flow
  is re-evaluated on its next frame under the new ones (with the SNI it had).
  Rule counters start at zero with the new tables.
* **SNI**: an egress TCP flow whose decision could depend on the TLS SNI (a
  domain rule that the SNI could make match or fail, before the first address
  rule that matches), or that would be allowed to an intercepted port, gets
  ``NEED_MORE`` until its ClientHello is complete (reassembled from in-order
  guest segments, across TLS records) - or ``hello_cap`` bytes, or
  ``hello_timeout`` seconds, or FIN/RST - and is then decided (without an SNI if
  none was found).  Hello buffers are bounded in total by ``hello_budget``
  bytes; a flow that would exceed it is denied (fail closed).
* **Names** of a flow come from the :class:`~netstack.PinCache` (``pins``).
* ``direction="egress"`` classifies guest-initiated traffic (frames from the
  guest); ``direction="ingress"`` peer-initiated traffic towards the guest
  (published ports: remote = the peer, port = the guest's port).  Replies
  within a guest-initiated flow are not classified: the gateway terminates TCP
  and relays UDP, so it synthesises them.
* DNS queries (UDP/TCP to port 53, any address, egress) get ``TO_DNS``; the
  forwarder applies ``policy.evaluate_dns`` per query.  Allowed TLS flows whose
  SNI matches an ``intercept`` suffix on an ``intercept_ports`` port get
  ``TO_PROXY``.  Denied TCP gets ``DENY_RST``, denied UDP ``DENY_ICMP``.
* **IP fragments**: a first fragment is classified like any packet (one too
  short for its L4 header is ``MALFORMED``); a later fragment (no L4 header)
  gets the verdict recorded for its datagram's first fragment, and ``DENY``
  when there is none (arrived first, expired, other tables), when it overlaps
  the bytes of the first fragment or ends past 65,535 bytes.  At most
  ``max_fragments`` records, each ``fragment_lifetime`` seconds (see
  ``netstack/csrc/frag.c``).

The decision for a flow equals ``policy.evaluate(Flow(...))`` (action and
rule index); :meth:`evaluate` exposes the C evaluator directly for that check.

>>> from netstack import Classifier, NetworkPolicy, Rule, Verdict
>>> from netstack import build_frame
>>> policy = NetworkPolicy.custom(rules=[Rule.allow(destination="192.0.2.0/24", protocol="tcp")])
>>> c = Classifier(policy, gateway=["10.0.2.2"])
>>> syn = build_frame("10.0.2.15", "192.0.2.7", "tcp", 40000, 80, flags=0x02)
>>> other = build_frame("10.0.2.15", "198.51.100.7", "tcp", 40001, 80, flags=0x02)
>>> [Verdict(v).label for v in c.classify([syn, other])]
['allow', 'deny-with-reset']
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from netstack._addresses import GROUPS, AddressLike, normalize_gateway
from netstack._fastpath import ffi, lib
from netstack._flow import Flow
from netstack._ipbytes import ip16
from netstack._names import normalize_domain
from netstack._pincache import PinCache
from netstack._policy import NetworkPolicy
from netstack.errors import FastPathError, PolicyError

Buffer = bytes | bytearray | memoryview
Direction = Literal["egress", "ingress"]

_DIR = {"egress": 1, "ingress": 2}
_DIRMASK = {"egress": 1, "ingress": 2, "any": 3}
_PBIT = {"tcp": 1, "udp": 2, "icmpv4": 4, "icmpv6": 8}
_KIND = {"any": 0, "cidr": 1, "domain": 2, "domain_suffix": 3, "group": 4}
_GROUP = {g: i + 1 for i, g in enumerate(GROUPS)}
_MAX_GATEWAY = 16
_MAX_INTERCEPT = 256


@dataclass(frozen=True, slots=True)
class RuleCounter:
    """Counters of one rule (or of a default): flows decided, frames and bytes.

    >>> RuleCounter(1, 10, 1500).packets
    10
    """

    hits: int
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """A flow-table entry: verdict, deciding rule (None = default), counters.

    >>> FlowInfo(0, None, False, 1, 60, 0.0, 0.0).pending
    False
    """

    verdict: int
    rule_index: int | None
    pending: bool
    packets: int
    bytes: int
    created: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class ClassifierStats:
    """Flow-table statistics.

    ``max_probe`` is the longest probe sequence (slots examined) any insert into
    the flow table has walked: the table is keyed per classifier with a random
    secret (SipHash-1-3), so a guest cannot craft 5-tuples that pile up in one
    bucket and this stays small (a handful at the table's load factor <= 0.5).

    ``fragments_*`` count the fragment table (both sides: guest frames and reply
    lookups of uplink frames): first fragments ``recorded``, later fragments that
    ``followed`` their first fragment's verdict, later fragments dropped as
    ``unmatched`` (no live record under the current tables) or ``bad`` (overlapping
    their first fragment, ending past 65,535 bytes, a bad header chain), live records
    ``evicted`` from a full bucket, and the ``live`` records.

    >>> ClassifierStats(0, 0, 0, 0, 0, 0, 0).live_flows
    0
    """

    flows_created: int
    flows_evicted: int
    flows_expired: int
    malformed: int
    hello_denied: int
    live_flows: int
    hello_bytes: int
    max_probe: int = 0
    fragments_recorded: int = 0
    fragments_followed: int = 0
    fragments_unmatched: int = 0
    fragments_bad: int = 0
    fragments_evicted: int = 0
    fragments_live: int = 0


@dataclass(frozen=True, slots=True)
class StreamResult:
    """Result of :meth:`Classifier.classify_stream`.

    ``verdicts[i]`` / ``rules[i]`` belong to the i-th frame of the buffer;
    ``consumed`` bytes were used (keep the rest for the next read); ``broken``
    means a length prefix was 0 or above 65,549 (drop the connection).

    >>> StreamResult(b"", [], 0, False).count
    0
    """

    verdicts: bytes
    rules: list[int]
    consumed: int
    broken: bool

    @property
    def count(self) -> int:
        """Number of frames classified."""
        return len(self.verdicts)


def _compile(policy: NetworkPolicy, gateway: tuple[bytes, ...], intercept: tuple[str, ...],
             intercept_ports: tuple[int, ...]) -> object:
    """Build the C tables for ``policy`` (an ``ns_policy *`` owned by the caller)."""
    if not isinstance(policy, NetworkPolicy):
        raise PolicyError(f"Classifier needs a NetworkPolicy, got {type(policy).__name__}")
    rules = policy.rules
    specs = ffi.new("ns_rule_spec[]", max(len(rules), 1))
    ranges: list[int] = []
    blob = bytearray()
    for i, rule in enumerate(rules):
        s = specs[i]
        s.action = 0 if rule.action == "allow" else 1
        s.dirmask = _DIRMASK[rule.direction]
        mask = 0
        for p in rule.protocols:
            mask |= _PBIT[p]
        s.protomask = mask or 15
        dest = rule.destination
        s.kind = _KIND[dest.kind]
        if dest.kind == "cidr":
            net = dest.network
            s.family = net.version
            s.prefix = net.prefixlen
            packed = net.network_address.packed
            ffi.memmove(s.addr, packed, len(packed))
        elif dest.kind == "group":
            assert dest.value is not None
            s.group = _GROUP[dest.value]
        elif dest.kind in ("domain", "domain_suffix"):
            assert dest.value is not None
            raw = dest.value.encode("ascii")
            s.name_off = len(blob)
            s.name_len = len(raw)
            blob += raw
        s.port_off = len(ranges) // 2
        s.port_count = len(rule.ports)
        for lo, hi in rule.ports:
            ranges += (lo, hi)
    cranges = ffi.new("uint16_t[]", ranges or [0, 0])
    cblob = ffi.new("uint8_t[]", bytes(blob) or b"\0")
    ptr = lib.ns_policy_build(specs, len(rules), cranges, len(ranges) // 2, cblob, len(blob),
                              int(policy.default_egress == "deny"),
                              int(policy.default_ingress == "deny"))
    if ptr == ffi.NULL:
        raise FastPathError(f"could not compile a policy of {len(rules)} rules (out of memory "
                            "or a rule the C tables cannot hold)")
    gw = b"".join(gateway)
    icpt = [n.encode("ascii") for n in intercept]
    lens = ffi.new("uint16_t[]", [len(n) for n in icpt] or [0])
    ports = ffi.new("uint16_t[]", list(intercept_ports) or [0])
    if (lib.ns_policy_set_gateway(ptr, gw, len(gateway)) != 0
            or lib.ns_policy_set_intercept(ptr, b"".join(icpt), lens, len(icpt), ports,
                                           len(intercept_ports)) != 0):
        lib.ns_policy_free(ptr)
        raise FastPathError("could not install gateway/intercept settings")
    return ptr


def _check_range(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise FastPathError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


class Classifier:
    """A compiled policy + flow table; classifies batches of frames in C.

    ``gateway``: the sandbox's gateway IPs (the ``host`` group; at most 16).
    ``pins``: the :class:`~netstack.PinCache` that supplies flow names (one is
    created if omitted).  ``intercept``: hostname suffixes whose allowed TLS
    flows on ``intercept_ports`` are steered to the TLS proxy (``TO_PROXY``).
    ``block_dns_bypass``: refuse the DNS side doors whatever the policy says (egress TCP
    853 -> ``DENY_RST``, UDP 853 -> ``DENY_ICMP``, UDP 5353/5355/137 -> ``DENY``), so name
    lookups can only go through the DNS forwarder; the gateway turns it on.
    ``max_fragments`` (16..1048576) / ``fragment_lifetime`` (seconds, at most 3600):
    the fragment table's bound and how long a first fragment's verdict is kept.
    See the module docstring for flow-table eviction, expiry and SNI rules.

    One classifier is driven by one packet loop at a time (calls from several
    Python threads are serialised by a lock); :meth:`recompile` may run
    concurrently with a batch.

    >>> from netstack import NetworkPolicy
    >>> with Classifier(NetworkPolicy.public_only(), gateway="10.0.2.2") as c:
    ...     c.evaluate(Flow("egress", "udp", "10.0.2.2", 53, gateway=["10.0.2.2"]))
    ('allow', 0)
    """

    def __init__(
        self,
        policy: NetworkPolicy,
        gateway: Iterable[AddressLike] | AddressLike = (),
        *,
        pins: PinCache | None = None,
        max_flows: int = 16384,
        tcp_idle: float = 300.0,
        udp_idle: float = 60.0,
        hello_cap: int = 16384,
        hello_timeout: float = 5.0,
        hello_budget: int = 64 << 20,
        intercept: Iterable[str] = (),
        intercept_ports: Iterable[int] = (443,),
        block_dns_bypass: bool = False,
        max_fragments: int = 4096,
        fragment_lifetime: float = 30.0,
    ) -> None:
        if isinstance(max_flows, bool) or not isinstance(max_flows, int) or not (
                16 <= max_flows <= 1 << 24):
            raise FastPathError(f"max_flows must be an integer 16..16777216, got {max_flows!r}")
        if isinstance(hello_cap, bool) or not isinstance(hello_cap, int) or not (
                64 <= hello_cap <= 65536):
            raise FastPathError(f"hello_cap must be an integer 64..65536, got {hello_cap!r}")
        if isinstance(hello_budget, bool) or not isinstance(hello_budget, int) or hello_budget < 0:
            raise FastPathError(f"hello_budget must be a byte count >= 0, got {hello_budget!r}")
        tcp_idle = _check_range("tcp_idle", tcp_idle, 0.001, 1e9)
        udp_idle = _check_range("udp_idle", udp_idle, 0.001, 1e9)
        hello_timeout = _check_range("hello_timeout", hello_timeout, 0.001, 1e9)
        if isinstance(max_fragments, bool) or not isinstance(max_fragments, int) or not (
                16 <= max_fragments <= 1 << 20):
            raise FastPathError(
                f"max_fragments must be an integer 16..1048576, got {max_fragments!r}")
        fragment_lifetime = _check_range("fragment_lifetime", fragment_lifetime, 0.001, 3600)
        self.pins = pins if pins is not None else PinCache()
        if not isinstance(self.pins, PinCache):
            raise FastPathError(f"pins must be a PinCache, got {type(pins).__name__}")
        self._gateway = self._norm_gateway(gateway)
        self._intercept = self._norm_intercept(intercept)
        self._intercept_ports = self._norm_ports(intercept_ports)
        ctx = lib.ns_ctx_new(max_flows, self.pins.handle)
        if ctx == ffi.NULL:
            raise FastPathError(f"out of memory allocating a flow table of {max_flows} flows")
        self._ctx = ffi.gc(ctx, lib.ns_ctx_free)
        if lib.ns_ctx_configure(self._ctx, tcp_idle, udp_idle, hello_cap, hello_timeout,
                                hello_budget) != 0:
            raise FastPathError("invalid flow-table configuration")
        if lib.ns_ctx_set_frag_limits(self._ctx, max_fragments, fragment_lifetime) != 0:
            raise FastPathError("invalid fragment-table configuration")
        if not isinstance(block_dns_bypass, bool):
            raise FastPathError(f"block_dns_bypass must be a bool, got {block_dns_bypass!r}")
        lib.ns_ctx_set_block_dns_bypass(self._ctx, int(block_dns_bypass))
        self.block_dns_bypass = block_dns_bypass
        self.max_flows = max_flows
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._policy = policy
        self._nrules = 0
        self._install(policy)

    # -- configuration ---------------------------------------------------------------
    @staticmethod
    def _norm_gateway(gateway: Iterable[AddressLike] | AddressLike) -> tuple[bytes, ...]:
        gws = tuple(dict.fromkeys(ip16(g) for g in normalize_gateway(gateway)))
        if len(gws) > _MAX_GATEWAY:
            raise FastPathError(f"at most {_MAX_GATEWAY} gateway addresses, got {len(gws)}")
        return gws

    @staticmethod
    def _norm_intercept(intercept: Iterable[str]) -> tuple[str, ...]:
        if isinstance(intercept, str):
            raise FastPathError(f"intercept must be a collection of names, got the string {intercept!r}")
        names = tuple(dict.fromkeys(normalize_domain(n, what="intercept name") for n in intercept))
        if len(names) > _MAX_INTERCEPT:
            raise FastPathError(f"at most {_MAX_INTERCEPT} intercept names, got {len(names)}")
        return names

    @staticmethod
    def _norm_ports(ports: Iterable[int]) -> tuple[int, ...]:
        out = tuple(dict.fromkeys(ports))
        for p in out:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 65535:
                raise FastPathError(f"intercept port must be an integer 0-65535, got {p!r}")
        if len(out) > 16:
            raise FastPathError(f"at most 16 intercept ports, got {len(out)}")
        return out

    def _install(self, policy: NetworkPolicy) -> None:
        ptr = _compile(policy, self._gateway, self._intercept, self._intercept_ports)
        with self._swap_lock:
            lib.ns_ctx_set_policy(self._c, ptr)  # ctx owns ptr from here on
            self._policy = policy
            self._nrules = len(policy.rules)
            self._evaluator: CompiledEvaluator | None = None

    @property
    def _c(self) -> object:
        if self._ctx is None:
            raise FastPathError("this Classifier is closed")
        return self._ctx

    @property
    def policy(self) -> NetworkPolicy:
        """The policy currently compiled."""
        return self._policy

    def recompile(self, policy: NetworkPolicy, *,
                  gateway: Iterable[AddressLike] | AddressLike | None = None,
                  intercept: Iterable[str] | None = None) -> None:
        """Compile ``policy`` and swap it in atomically (see the module docstring).

        >>> from netstack import NetworkPolicy
        >>> c = Classifier(NetworkPolicy.none())
        >>> c.recompile(NetworkPolicy.allow_all()); c.policy.default_egress
        'allow'
        """
        if gateway is not None:
            self._gateway = self._norm_gateway(gateway)
        if intercept is not None:
            self._intercept = self._norm_intercept(intercept)
        self._install(policy)

    # -- classification --------------------------------------------------------------
    def classify(self, frames: Sequence[Buffer], *, direction: Direction = "egress",
                 now: float | None = None) -> bytes:
        """Classify frames (each a bytes-like Ethernet frame); one verdict byte each.

        ``now`` is a monotonic time in seconds (default ``time.monotonic()``).
        Decode a byte with :class:`~netstack.Verdict`.

        >>> from netstack import NetworkPolicy
        >>> Classifier(NetworkPolicy.none()).classify([b"junk"])
        b'\\x07'
        """
        return self.classify_with_rules(frames, direction=direction, now=now)[0]

    def classify_with_rules(self, frames: Sequence[Buffer], *, direction: Direction = "egress",
                            now: float | None = None) -> tuple[bytes, list[int]]:
        """Like :meth:`classify`, also returning each frame's rule index (-1 = default/none).

        >>> from netstack import NetworkPolicy
        >>> Classifier(NetworkPolicy.none()).classify_with_rules([b"junk"])
        (b'\\x07', [-1])
        """
        d = _direction(direction)
        n = len(frames)
        if n == 0:
            return b"", []
        bufs = [ffi.from_buffer("uint8_t[]", f) for f in frames]
        ptrs = ffi.new("uint8_t *[]", bufs)
        lens = ffi.new("uint32_t[]", [len(b) for b in bufs])
        verdicts = ffi.new("uint8_t[]", n)
        rules = ffi.new("int32_t[]", n)
        t = _now(now)
        with self._lock:
            lib.ns_classify_batch(self._c, ptrs, lens, n, d, t, verdicts, rules)
        return bytes(ffi.buffer(verdicts, n)), list(rules)

    def classify_stream(self, buf: Buffer, *, direction: Direction = "egress",
                        now: float | None = None, max_frames: int | None = None,
                        out: bytearray | None = None) -> StreamResult:
        """Classify the u32-BE-length-prefixed frames of one buffer, in place (no copies).

        Stops at an incomplete trailing frame (``consumed`` tells where).  ``out``
        may be a reusable bytearray for the verdicts (grown as needed).

        >>> from netstack import NetworkPolicy
        >>> from netstack import build_frame
        >>> f = build_frame("10.0.2.15", "192.0.2.1", "udp", 5000, 53)
        >>> r = Classifier(NetworkPolicy.none()).classify_stream(len(f).to_bytes(4, "big") + f + b"\\0\\0")
        >>> r.verdicts, r.consumed
        (b'\\x05', 46)
        """
        d = _direction(direction)
        data = ffi.from_buffer("uint8_t[]", buf)
        # a frame occupies at least 5 bytes (prefix + 1); shorter frames are malformed
        cap = len(data) // 5 + 1 if max_frames is None else max(0, int(max_frames))
        verdicts = ffi.new("uint8_t[]", max(cap, 1))
        rules = ffi.new("int32_t[]", max(cap, 1))
        consumed = ffi.new("size_t *")
        t = _now(now)
        with self._lock:
            n = lib.ns_classify_stream(self._c, data, len(data), d, t, verdicts, rules, cap,
                                       consumed)
            broken = bool(lib.ns_stream_broken(self._c))
        return StreamResult(bytes(ffi.buffer(verdicts, n)), list(rules[0:n]), int(consumed[0]),
                            broken)

    def classify_stream_raw(self, buf: Buffer, verdicts: object, rules: object, max_frames: int,
                            *, direction: Direction = "egress", now: float | None = None,
                            ) -> tuple[int, int]:
        """Lowest-overhead variant: caller-owned cffi arrays; returns (frames, consumed).

        ``verdicts`` is a ``uint8_t[]`` and ``rules`` an ``int32_t[]`` (or
        ``ffi.NULL``) from :attr:`ffi`, each of at least ``max_frames`` entries.

        >>> from netstack import NetworkPolicy
        >>> c = Classifier(NetworkPolicy.none())
        >>> v = Classifier.ffi.new("uint8_t[]", 8)
        >>> c.classify_stream_raw(b"", v, Classifier.ffi.NULL, 8)
        (0, 0)
        """
        data = ffi.from_buffer("uint8_t[]", buf)
        consumed = ffi.new("size_t *")
        with self._lock:
            n = lib.ns_classify_stream(self._c, data, len(data), _direction(direction),
                                       _now(now), verdicts, rules, max_frames, consumed)
        return int(n), int(consumed[0])

    ffi = ffi

    # -- the evaluator, for differential checks --------------------------------------
    def evaluate(self, flow: Flow) -> tuple[str, int | None]:
        """Evaluate one :class:`~netstack.Flow` with the C tables: ``(action, rule_index)``.

        Uses ``flow.names``, ``flow.sni`` and ``flow.gateway`` exactly as given -
        the same inputs as ``policy.evaluate(flow)``, whose action and rule
        index it must equal.

        >>> from netstack import NetworkPolicy
        >>> Classifier(NetworkPolicy.public_only()).evaluate(Flow("egress", "tcp", "192.0.2.1", 443))
        ('allow', 1)
        """
        with self._swap_lock:
            if self._evaluator is None:
                self._evaluator = CompiledEvaluator(self._policy, _gw16=self._gateway)
            ev = self._evaluator
        return ev.evaluate(flow)

    def evaluator(self) -> CompiledEvaluator:
        """A standalone compiled copy of the current tables for many :meth:`evaluate` calls.

        >>> from netstack import NetworkPolicy
        >>> with Classifier(NetworkPolicy.none()).evaluator() as ev:
        ...     ev.evaluate(Flow("egress", "udp", "192.0.2.1", 53))
        ('deny', None)
        """
        with self._swap_lock:
            return CompiledEvaluator(self._policy, _gw16=self._gateway)

    # -- introspection ----------------------------------------------------------------
    def flow_info(self, frame: Buffer, *, direction: Direction = "egress") -> FlowInfo | None:
        """The flow-table entry ``frame`` belongs to, or None.

        >>> from netstack import NetworkPolicy
        >>> Classifier(NetworkPolicy.none()).flow_info(b"junk") is None
        True
        """
        data = ffi.from_buffer("uint8_t[]", frame)
        out = ffi.new("ns_flow_info *")
        with self._lock:
            rc = lib.ns_ctx_flow_info(self._c, data, len(data), _direction(direction), out)
        if rc != 1:
            return None
        return FlowInfo(int(out.verdict), None if out.rule < 0 else int(out.rule),
                        bool(out.state == 1), int(out.packets), int(out.bytes),
                        float(out.created), float(out.last_seen))

    def rule_counters(self) -> list[RuleCounter]:
        """Counters per rule, then the egress default and the ingress default.

        >>> from netstack import NetworkPolicy
        >>> Classifier(NetworkPolicy.public_only()).rule_counters()[0]
        RuleCounter(hits=0, packets=0, bytes=0)
        """
        n = self._nrules + 2
        out = ffi.new("ns_rule_counter[]", n)
        got = lib.ns_ctx_rule_counters(self._c, out, n)
        return [RuleCounter(int(out[i].hits), int(out[i].packets), int(out[i].bytes))
                for i in range(got)]

    def stats(self) -> ClassifierStats:
        """Flow-table statistics (created, evicted, expired, malformed frames ...).

        >>> from netstack import NetworkPolicy
        >>> Classifier(NetworkPolicy.none()).stats().live_flows
        0
        """
        out = ffi.new("ns_ctx_stats *")
        fs = ffi.new("ns_frag_stats *")
        with self._lock:
            lib.ns_ctx_stats_get(self._c, out)
            lib.ns_ctx_frag_stats(self._c, fs)
        return ClassifierStats(int(out.flows_created), int(out.flows_evicted),
                               int(out.flows_expired), int(out.malformed), int(out.hello_denied),
                               int(out.live_flows), int(out.hello_bytes), int(out.max_probe),
                               int(fs.recorded), int(fs.followed), int(fs.unmatched),
                               int(fs.bad), int(fs.evicted), int(fs.live))

    def __len__(self) -> int:
        """Number of flows in the table."""
        return int(lib.ns_ctx_flow_count(self._c))

    def expire(self, now: float | None = None) -> None:
        """Remove idle-expired flows now (they are re-evaluated lazily anyway).

        >>> from netstack import NetworkPolicy
        >>> Classifier(NetworkPolicy.none()).expire()
        """
        with self._lock:
            lib.ns_ctx_expire(self._c, _now(now))

    @property
    def handle(self) -> object:
        """The C ``ns_ctx *`` for a C packet loop (see ``netstack/csrc/netstack.h``).

        Keep this Classifier alive, do not :meth:`close` it, and do not call its
        batch methods from Python while a C loop drives the handle (one packet
        loop per context; :meth:`recompile` remains safe concurrently).

        >>> from netstack import NetworkPolicy
        >>> Classifier(NetworkPolicy.none()).handle is not None
        True
        """
        return self._c

    def close(self) -> None:
        """Free the C tables now (also happens when the object is collected)."""
        with self._lock, self._swap_lock:
            ctx = self._ctx
            if ctx is not None:
                self._ctx = None
                ffi.gc(ctx, None)
                lib.ns_ctx_free(ctx)

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class CompiledEvaluator:
    """The C first-match evaluator over a private compiled copy of a policy.

    For differential testing against ``policy.evaluate`` and for tools; it has
    no flow table.

    >>> from netstack import NetworkPolicy
    >>> ev = CompiledEvaluator(NetworkPolicy.public_only(), gateway=["10.0.2.2"])
    >>> ev.evaluate(Flow("egress", "tcp", "10.0.0.9", 22))
    ('deny', None)
    """

    def __init__(self, policy: NetworkPolicy,
                 gateway: Iterable[AddressLike] | AddressLike = (),
                 *, _gw16: tuple[bytes, ...] | None = None) -> None:
        gw = _gw16 if _gw16 is not None else Classifier._norm_gateway(gateway)
        self._ptr = ffi.gc(_compile(policy, gw, (), ()), lib.ns_policy_free)
        self.policy = policy

    def evaluate(self, flow: Flow) -> tuple[str, int | None]:
        """``(action, rule_index)`` for ``flow`` (same inputs as ``policy.evaluate``).

        >>> from netstack import NetworkPolicy
        >>> CompiledEvaluator(NetworkPolicy.allow_all()).evaluate(Flow("ingress", "udp", "::1", 9))
        ('allow', None)
        """
        q = ffi.new("ns_flowq *")
        q.direction = _DIR[flow.direction]
        q.pbit = _PBIT[flow.protocol]
        q.has_port = flow.port is not None
        q.port = flow.port or 0
        ffi.memmove(q.remote, ip16(flow.remote), 16)
        q.family = flow.remote.version
        sni = None
        if flow.sni is not None:
            sni = ffi.new("uint8_t[]", flow.sni.encode("ascii"))
            q.sni = sni
            q.sni_len = len(flow.sni)
        gw = ffi.new("uint8_t[]", b"".join(ip16(g) for g in flow.gateway[:16]) or bytes(16))
        q.gateway = gw
        q.ngw = min(len(flow.gateway), 16)
        raw = [n.encode("ascii") for n in sorted(flow.names)[:64]]
        blob = ffi.new("uint8_t[]", b"".join(raw) or b"\0")
        lens = ffi.new("uint16_t[]", [len(r) for r in raw] or [0])
        rule = ffi.new("int32_t *")
        act = lib.ns_policy_eval_packed(self._ptr, q, blob, lens, len(raw), rule)
        del sni, gw
        return ("allow" if act == 0 else "deny"), (None if rule[0] < 0 else int(rule[0]))

    def close(self) -> None:
        """Free the compiled tables now."""
        ptr = self._ptr
        if ptr is not None:
            self._ptr = None
            ffi.gc(ptr, None)
            lib.ns_policy_free(ptr)

    def __enter__(self) -> CompiledEvaluator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _direction(direction: str) -> int:
    try:
        return _DIR[direction]
    except (KeyError, TypeError):
        raise FastPathError(f"direction must be 'egress' or 'ingress', got {direction!r}") from None


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else float(now)
