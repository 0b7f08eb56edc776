"""Agent wire protocol: frame codec and message types.

A frame is ``[u32 len BE][u32 id BE][u8 flags][CBOR body]`` where ``len``
counts id + flags + body (at most :data:`MAX_FRAME`, 4 MiB) and the body is the
map ``{"v": generation, "t": type, "p": payload}``. Flags: :data:`TERMINAL`
(last frame of this id), :data:`SESSION_START` (opens an exec session),
:data:`SHUTDOWN` (on the shutdown ack). The host speaks first.

Messages (``t``: payload), host -> guest unless marked "guest":

* ``core.hello {version}`` -> guest ``core.ready {version, generation, pid,
  boot_ms, agent, host_mode}``; ``generation = min(host, guest)``. A hello
  starts a host session: exec sessions of an earlier host (after a reconnect)
  are detached (they keep running unless ``kill_on_disconnect``; their output
  is dropped and their ids are free again). In the guest, a closed-looking
  port ends the host session only after 2 s (a quick reconnect's notices can
  trail its data); output written meanwhile waits for the host.
* ``core.bootstrap {hostname?, root?, network?, ca_certs?, env?, mounts?,
  kill_on_disconnect?}`` -> guest ``core.bootstrap.ack {skipped: [str]}`` or
  ``core.error``. ``root`` is null (keep /dev/vda), ``{"kind": "disk", "device",
  "fstype", "readonly"?}`` or ``{"kind": "overlay", "lower": [{"device",
  "fstype"}] (top-most first), "upper": {"device", "fstype", "upperdir",
  "workdir"}}``. ``network``: ``{"interface", "mac"?, "mtu"?, "ipv4"?: {"address",
  "prefix_len", "gateway"?, "dns"?: [str]}, "ipv6"?: {same}, "hosts"?: {name:
  ip}}``. ``mounts``: ``[{"tag", "path", "readonly"?}]`` (virtio-fs). In host
  mode root/hostname/network/mounts are skipped and files go under ``--sysroot``.
* ``core.ping {}`` -> guest ``core.pong {}``.
* ``core.reconfigure {hostname?, network?, clock?: {realtime_ns}, entropy?: bytes}``
  -> guest ``core.reconfigure.ack {applied: [str]}`` or ``core.error``
  (``bad_request``, ``bootstrap_failed``): a new identity for a guest restored from a
  snapshot or forked (any number of times, unlike the one-shot bootstrap). In order:
  ``entropy`` (16-512 host random bytes) is credited to the kernel's input pool
  (``RNDADDENTROPY``) and the CRNG reseeded (``RNDRESEEDCRNG``); ``CLOCK_REALTIME`` is
  stepped to ``realtime_ns``; the interface (``network.interface``, default eth0)
  stays up and loses its addresses (IPv4: its routes and ARP entries go with it; every
  IPv6 address and default route) and is configured as in ``core.bootstrap`` (MAC
  changed live, MTU, addresses, routes, ``/etc/hosts``, ``resolv.conf``), plus the new
  MAC's link-local address; ``hostname`` is set. Host mode applies none of these.
* ``core.exec.request {cmd, args?, env? ({K: V} or ["K=V"]), cwd?, user? (name,
  uid or "uid:gid"), tty?, rows?, cols?, stdin? (false: /dev/null), rlimits?:
  [{resource, soft, hard}] (-1/null = unlimited), timeout_ms?}`` with
  SESSION_START -> guest ``core.exec.started {pid}``, ``core.exec.stdout {data}``,
  ``core.exec.stderr {data}``, ``core.exec.stdin.ack {bytes}`` (stdin bytes
  consumed by the process, or dropped after it closed stdin: the host keeps
  at most a window unacknowledged), ``core.exec.stdin.error {message}``
  (backlog over 16 MiB: data dropped; our client never gets there), then
  TERMINAL ``core.exec.exited {code, signal, timed_out}`` (``code`` = exit
  status, or -1 when killed by ``signal``) or ``core.exec.failed {kind, errno,
  errno_name, stage, message}``. Host -> guest on the same id:
  ``core.exec.stdin {data}`` (empty = EOF), ``core.exec.resize {rows, cols}``,
  ``core.exec.signal {signal}`` (sent to the process group).
* ``core.fs.request {op, path, ...}`` -> TERMINAL guest ``core.fs.response
  {ok: true, ...}`` or ``{ok: false, errno, errno_name, message}``. Ops:
  ``read {offset?, length?}`` (guest streams ``core.fs.data {data}`` first,
  then ``{ok, size}``), ``write {mode?, append?, mkdirs?, data?}`` (without
  ``data`` the host streams ``core.fs.data {data}``, ending with an empty one),
  ``list`` (``entries``), ``stat {follow?}``, ``mkdir {mode?, parents?}``,
  ``remove {recursive?}``, ``rename {dst}``, ``copy {dst, recursive?}``.
* ``core.metrics.request {}`` -> guest ``core.metrics.response {uptime_ms,
  load, cpu, memory, disk, net}``.
* ``core.shutdown {exit_code}`` -> guest ``core.shutdown.ack {exit_code}``
  (TERMINAL|SHUTDOWN), then the guest syncs and reboots (the VMM exits).
* guest ``core.error {kind, message}`` (TERMINAL): malformed, oversized,
  unknown_type, bad_request, version, bootstrap_failed, internal. Errors
  about a frame whose id could not be read use id 0.

Bodies are decoded by a strict CBOR reader limited to what the guest agent's encoder
(``csrc/cbor.c``) emits: integers, byte and text strings (valid UTF-8), arrays and
maps of definite length (non-minimal heads allowed), false/true/null and float64,
nested at most :data:`MAX_DEPTH` deep, one item per body. Tags (e.g. the shared-value
tags that can build a self-containing list), indefinite lengths, undefined, other
simple values, half/single floats, duplicate or container map keys and trailing bytes
are refused with :class:`ProtocolError`: the guest is untrusted.

Example::

    >>> data = encode_frame(Frame(7, TERMINAL, "core.ping", {}))
    >>> FrameDecoder().feed(data)[0].type
    'core.ping'
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2

from microvm.errors import AgentError

PROTOCOL_VERSION = 1
MAX_FRAME = 4 * 1024 * 1024
TERMINAL = 0x01
SESSION_START = 0x02
SHUTDOWN = 0x04
MAX_ID = 0xFFFFFFFF
MAX_DEPTH = 32
"""Deepest array/map nesting accepted in a body (the guest agent's own limit)."""

_HDR = struct.Struct(">IIB")
_F64 = struct.Struct(">d")


class ProtocolError(AgentError):
    """A frame could not be encoded or decoded (bad length, CBOR or envelope).

    Example::

        try:
            FrameDecoder().feed(b"\\x00\\x00\\x00\\x01xxxxx")
        except ProtocolError as e:
            print(e)
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="protocol")


@dataclass(frozen=True)
class Frame:
    """One protocol frame.

    Example::

        Frame(id=1, flags=0, type="core.hello", payload={"version": 1})
    """

    id: int
    flags: int
    type: str
    payload: Any = None
    version: int = PROTOCOL_VERSION

    @property
    def terminal(self) -> bool:
        """True when this is the last frame for its id.

        Example::

            assert Frame(1, TERMINAL, "core.pong", {}).terminal
        """
        return bool(self.flags & TERMINAL)


def encode_body(type_: str, payload: Any, version: int = PROTOCOL_VERSION) -> bytes:
    """CBOR-encode the envelope ``{"v", "t", "p"}``.

    Example::

        body = encode_body("core.ping", {})
    """
    return bytes(cbor2.dumps({"v": version, "t": type_, "p": payload}))


def encode_raw(id_: int, flags: int, body: bytes) -> bytes:
    """Frame an already-encoded body; raises :class:`ProtocolError` when it does not fit.

    Example::

        wire = encode_raw(1, 0, encode_body("core.ping", {}))
    """
    if not 0 <= id_ <= MAX_ID:
        raise ProtocolError(f"frame id {id_} is outside 0..{MAX_ID}")
    if not 0 <= flags <= 0xFF:
        raise ProtocolError(f"frame flags {flags} are outside 0..255")
    length = len(body) + 5
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte maximum")
    return _HDR.pack(length, id_, flags) + body


def encode_frame(frame: Frame) -> bytes:
    """Encode a :class:`Frame` to wire bytes.

    Example::

        wire = encode_frame(Frame(1, 0, "core.hello", {"version": 1}))
    """
    return encode_raw(frame.id, frame.flags, encode_body(frame.type, frame.payload, frame.version))


class _Cbor:
    """The strict CBOR reader behind :func:`decode_cbor` (one body, one pass)."""

    __slots__ = ("b", "n", "off")

    def __init__(self, data: bytes) -> None:
        self.b = data
        self.n = len(data)
        self.off = 0

    def _fail(self, what: str) -> ProtocolError:
        return ProtocolError(f"{what} at byte {self.off}")

    def _arg(self, info: int) -> int:
        if info < 24:
            return info
        if info > 27:
            if info == 31:
                raise self._fail("indefinite-length item (the agent sends definite lengths only)")
            raise self._fail(f"reserved CBOR additional info {info}")
        size = 1 << (info - 24)
        end = self.off + size
        if end > self.n:
            raise self._fail("truncated CBOR head")
        v = int.from_bytes(self.b[self.off:end], "big")
        self.off = end
        return v

    def item(self, depth: int) -> Any:
        if self.off >= self.n:
            raise self._fail("truncated CBOR")
        ib = self.b[self.off]
        self.off += 1
        major, info = ib >> 5, ib & 0x1F
        if major == 7:
            if info == 20:
                return False
            if info == 21:
                return True
            if info == 22:
                return None
            if info == 27:
                end = self.off + 8
                if end > self.n:
                    raise self._fail("truncated float64")
                (f,) = _F64.unpack_from(self.b, self.off)
                self.off = end
                return f
            raise self._fail(f"CBOR simple/float 0x{ib:02x} (only false, true, null and "
                             "float64 are accepted)")
        arg = self._arg(info)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2 or major == 3:
            end = self.off + arg
            if end > self.n:
                raise self._fail(f"string of {arg} bytes runs past the end")
            raw = self.b[self.off:end]
            self.off = end
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self._fail("text string is not valid UTF-8") from None
        if major == 6:
            raise self._fail(f"CBOR tag {arg} (the agent never sends tags)")
        if depth >= MAX_DEPTH:  # a container here could hold items deeper than MAX_DEPTH
            raise self._fail(f"nesting deeper than {MAX_DEPTH}")
        if major == 4:
            if arg > self.n - self.off:  # every item takes at least one byte
                raise self._fail(f"array of {arg} items runs past the end")
            return [self.item(depth + 1) for _ in range(arg)]
        if arg > (self.n - self.off) // 2:
            raise self._fail(f"map of {arg} pairs runs past the end")
        out: dict[Any, Any] = {}
        for _ in range(arg):
            key = self.item(depth + 1)
            if isinstance(key, list | dict):
                raise self._fail("map key is an array or a map")
            if key in out:
                raise self._fail(f"duplicate map key {str(key)[:40]!r}")
            out[key] = self.item(depth + 1)
        return out


def decode_cbor(data: bytes) -> Any:
    """Decode exactly one CBOR item from ``data`` with the strict agent subset (see the
    module notes); anything else raises :class:`ProtocolError`.

    Example::

        >>> decode_cbor(bytes.fromhex("a2616101616282f5f6"))
        {'a': 1, 'b': [True, None]}
        >>> decode_cbor(bytes.fromhex("d81c81d81d00"))   # shared-value tags: self-containing
        Traceback (most recent call last):
        ...
        microvm.agent.protocol.ProtocolError: CBOR tag 28 (the agent never sends tags) at byte 2
    """
    r = _Cbor(bytes(data))
    obj = r.item(0)
    if r.off != r.n:
        raise ProtocolError(f"{r.n - r.off} trailing bytes after the CBOR item")
    return obj


def decode_body(id_: int, flags: int, body: bytes) -> Frame:
    """Decode a CBOR envelope into a :class:`Frame` (strict: see :func:`decode_cbor`).

    Example::

        f = decode_body(1, 0, encode_body("core.pong", {}))
    """
    try:
        obj = decode_cbor(body)
    except ProtocolError as e:
        raise ProtocolError(f"frame {id_}: body is not valid agent CBOR: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame {id_}: body is {type(obj).__name__}, expected a map")
    v, t = obj.get("v"), obj.get("t")
    if not isinstance(v, int) or not isinstance(t, str):
        raise ProtocolError(f"frame {id_}: envelope needs integer 'v' and text 't', got {v!r}, {t!r}")
    return Frame(id_, flags, t, obj.get("p"), v)


class FrameDecoder:
    """Incremental frame decoder for a byte stream.

    Example::

        dec = FrameDecoder()
        frames = dec.feed(wire_bytes)
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete (raises :class:`ProtocolError`).

        Example::

            FrameDecoder().feed(encode_frame(Frame(1, 0, "core.ping", {})))
        """
        self._buf += data
        out: list[Frame] = []
        off, n = 0, len(self._buf)
        try:
            while n - off >= 4:
                (length,) = struct.unpack_from(">I", self._buf, off)
                if length < 5 or length > self._max:
                    raise ProtocolError(f"frame length {length} is outside 5..{self._max}")
                if n - off < 4 + length:
                    break
                _, id_, flags = _HDR.unpack_from(self._buf, off)
                body = bytes(self._buf[off + 9 : off + 4 + length])
                off += 4 + length
                out.append(decode_body(id_, flags, body))
        finally:
            del self._buf[:off]
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered towards an incomplete frame.

        Example::

            assert FrameDecoder().pending == 0
        """
        return len(self._buf)


def payload_map(frame: Frame) -> dict[str, Any]:
    """The frame's payload as a dict ({} for null); :class:`ProtocolError` otherwise.

    The guest is untrusted: every field the host reads is type-checked.

    Example::

        p = payload_map(Frame(1, 0, "core.pong", {}))
    """
    if frame.payload is None:
        return {}
    if not isinstance(frame.payload, dict):
        raise ProtocolError(f"{frame.type} (id {frame.id}): payload is {type(frame.payload).__name__}, expected a map")
    return frame.payload


def field_int(p: dict[str, Any], key: str, default: int | None = 0) -> int:
    """An integer field (bools rejected); ``default`` when absent/null (None: required).

    Example::

        field_int({"code": 3}, "code")
    """
    v = p.get(key)
    if v is None and default is not None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"field {key!r} must be an integer, got {type(v).__name__}")
    return v


def field_str(p: dict[str, Any], key: str, default: str = "") -> str:
    """A text field (``default`` when absent/null).

    Example::

        field_str({"kind": "x"}, "kind")
    """
    v = p.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ProtocolError(f"field {key!r} must be text, got {type(v).__name__}")
    return v


def field_bytes(p: dict[str, Any], key: str) -> bytes:
    """A byte-string field (required).

    Example::

        field_bytes({"data": b"x"}, "data")
    """
    v = p.get(key)
    if not isinstance(v, bytes):
        raise ProtocolError(f"field {key!r} must be bytes, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class ReadyInfo:
    """The agent's ``core.ready`` answer to ``core.hello``.

    Example::

        info = await client.hello()
        print(info.generation, info.boot_ms)
    """

    version: int
    generation: int
    pid: int
    boot_ms: int
    agent: str = ""
    host_mode: bool = False


@dataclass(frozen=True)
class ExecResult:
    """Outcome of a collected exec: ``exit_code`` is -1 when killed by ``signal``.

    Example::

        r = await client.exec("echo", ["hi"])
        assert r.exit_code == 0 and r.stdout == b"hi\\n"
    """

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    pid: int = 0

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0.

        Example::

            assert ExecResult(0).ok
        """
        return self.exit_code == 0


@dataclass(frozen=True)
class ExecEvent:
    """One event of a streamed exec: ``kind`` is started, stdout, stderr, stdin_error or exited.

    Example::

        async for ev in client.exec_stream("ls"):
            if ev.kind == "stdout":
                print(ev.data)
    """

    kind: str
    data: bytes = b""
    pid: int = 0
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    message: str = ""


@dataclass(frozen=True)
class FileStat:
    """File metadata from ``stat``/``list_dir``; ``type`` is file, dir, symlink or other.

    Example::

        st = await client.stat("/etc/hostname")
        print(st.size, oct(st.mode))
    """

    name: str
    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    target: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_payload(cls, name: str, p: dict[str, Any]) -> FileStat:
        """Build from a ``core.fs.response``/list entry payload.

        Example::

            FileStat.from_payload("x", {"type": "file", "size": 1, "mode": 420,
                                        "uid": 0, "gid": 0, "mtime_ns": 0})
        """
        target, raw_name = p.get("target"), p.get("name", name)
        if isinstance(target, bytes):  # not UTF-8 in the guest: keep the bytes via surrogateescape
            target = os.fsdecode(target)
        return cls(
            name=os.fsdecode(raw_name) if isinstance(raw_name, bytes) else field_str(p, "name", name),
            type=field_str(p, "type", "other"),
            size=field_int(p, "size"),
            mode=field_int(p, "mode"),
            uid=field_int(p, "uid"),
            gid=field_int(p, "gid"),
            mtime_ns=field_int(p, "mtime_ns"),
            target=target if isinstance(target, str) else None,
        )


def error_from_payload(context: str, payload: Any) -> AgentError:
    """Turn a ``core.error`` / failed payload into an :class:`AgentError`.

    Example::

        err = error_from_payload("exec 'x'", {"kind": "not_found", "message": "no such file"})
    """
    p = payload if isinstance(payload, dict) else {}
    kind, msg, errno, errno_name = p.get("kind"), p.get("message"), p.get("errno"), p.get("errno_name")
    kind = kind if isinstance(kind, str) else "other"
    msg = msg[:4096] if isinstance(msg, str) else "no message"
    return AgentError(
        f"{context}: {msg} ({kind})",
        kind=kind,
        errno=errno if isinstance(errno, int) and not isinstance(errno, bool) else 0,
        errno_name=errno_name if isinstance(errno_name, str) else "",
    )
