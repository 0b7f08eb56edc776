"""A thread-safe, size-bounded capture writer (classic pcap or pcapng).

* ``format="pcap"``: classic libpcap files (magic ``a1b2c3d4``, microsecond
  timestamps, ``LINKTYPE_ETHERNET``). The verdict cannot be stored in this format
  and is ignored.
* ``format="pcapng"``: one Section Header and one Interface Description block
  (Ethernet) per file, then an Enhanced Packet Block per frame whose ``opt_comment``
  carries the verdict text (e.g. ``"allow rule 0: ..."``) and whose ``epb_flags``
  carries the direction (``"in"``: guest -> gateway, ``"out"``: gateway -> guest).
  Wireshark shows the comment as ``frame.comment`` (filter ``frame.comment contains
  "deny"``).

Rotation: with ``max_bytes``, a frame that would push the current file past the limit
first rotates ``path`` -> ``path.1`` -> ... -> ``path.<max_files-1>`` (the oldest is
deleted) and starts a fresh file with its own header, so the capture on disk never
exceeds ``max_files * max_bytes`` (plus one frame). Frames longer than ``snaplen`` are
cut to it (the original length is recorded).

Why our own writer rather than scapy or dpkt's: the formats are a few fixed headers,
the gateway writes from its frame loop under a lock with size-bounded rotation, and the
verdict goes into pcapng's per-packet comment, which neither library's writer offers
without pulling in a packet model we never use.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "cap.pcapng")
>>> with PcapWriter(path, format="pcapng") as w:
...     w.write(b"\\x02" * 60, verdict="allow", direction="in")
>>> w.frames_written
1
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path
from typing import BinaryIO, Final, Literal

from netstack.errors import PcapError

LINKTYPE_ETHERNET: Final = 1
_PCAP_MAGIC: Final = 0xA1B2C3D4
_SHB: Final = 0x0A0D0D0A
_IDB: Final = 0x00000001
_EPB: Final = 0x00000006
_BOM: Final = 0x1A2B3C4D
_DIRECTIONS: Final = {None: 0, "in": 1, "out": 2}

Format = Literal["pcap", "pcapng"]


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


class PcapWriter:
    """Append Ethernet frames to ``path``; safe to call :meth:`write` from many threads.

    ``max_bytes`` (>= 4096) bounds each file, ``max_files`` (>= 1) the number kept,
    ``snaplen`` (64..262144) the bytes stored per frame.

    >>> import tempfile, os
    >>> w = PcapWriter(os.path.join(tempfile.mkdtemp(), "x.pcap"))
    >>> w.write(bytes(64)); w.close(); w.bytes_written
    104
    """

    def __init__(self, path: str | os.PathLike[str], *, format: Format = "pcap",
                 snaplen: int = 65535, max_bytes: int | None = None, max_files: int = 5
                 ) -> None:
        if format not in ("pcap", "pcapng"):
            raise PcapError(f"format must be 'pcap' or 'pcapng', got {format!r}")
        if isinstance(snaplen, bool) or not isinstance(snaplen, int) \
                or not 64 <= snaplen <= 262144:
            raise PcapError(f"snaplen must be an int in 64..262144, got {snaplen!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool)
                                      or not isinstance(max_bytes, int) or max_bytes < 4096):
            raise PcapError(f"max_bytes must be None or an int >= 4096, got {max_bytes!r}")
        if isinstance(max_files, bool) or not isinstance(max_files, int) or max_files < 1:
            raise PcapError(f"max_files must be an int >= 1, got {max_files!r}")
        self.path = Path(path)
        self.format: Format = format
        self.snaplen = snaplen
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.frames_written = 0
        self.bytes_written = 0  # across all files, headers included
        self.rotations = 0
        self._lock = threading.Lock()
        self._size = 0
        self._file: BinaryIO | None = None
        self._header_len = len(self._header())
        self._open()

    # -- file handling -------------------------------------------------------------
    def _header(self) -> bytes:
        if self.format == "pcap":
            return struct.pack("<IHHiIII", _PCAP_MAGIC, 2, 4, 0, 0, self.snaplen,
                               LINKTYPE_ETHERNET)
        shb = _block(_SHB, struct.pack("<IHHq", _BOM, 1, 0, -1)
                     + _option(4, b"netstack.gateway.PcapWriter") + _option(0, b""))
        idb = _block(_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, self.snaplen)
                     + _option(2, b"gateway") + _option(9, b"\x06") + _option(0, b""))
        return shb + idb

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "wb")  # noqa: SIM115 - kept open until close()
        except OSError as e:
            raise PcapError(f"cannot open capture file {str(self.path)!r}: {e}") from e
        header = self._header()
        f.write(header)
        self._file = f
        self._size = len(header)
        self.bytes_written += len(header)

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        oldest = self.path.with_name(f"{self.path.name}.{self.max_files - 1}")
        if self.max_files == 1:
            self.path.unlink(missing_ok=True)
        else:
            oldest.unlink(missing_ok=True)
            for i in range(self.max_files - 2, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    src.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
            self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self.rotations += 1
        self._open()

    # -- records -------------------------------------------------------------------
    def _record(self, frame: bytes, ts: float, verdict: str | None,
                direction: str | None) -> bytes:
        data = frame[: self.snaplen]
        usec_total = round(ts * 1_000_000)
        if self.format == "pcap":
            sec, usec = divmod(usec_total, 1_000_000)
            return struct.pack("<IIII", sec, usec, len(data), len(frame)) + data
        opts = b""
        if verdict:
            opts += _option(1, verdict.encode("utf-8", "replace")[:65000])
        if direction is not None:
            opts += _option(2, struct.pack("<I", _DIRECTIONS[direction]))
        if opts:
            opts += _option(0, b"")
        body = struct.pack("<IIIII", 0, usec_total >> 32, usec_total & 0xFFFFFFFF, len(data),
                           len(frame)) + _pad4(data) + opts
        return _block(_EPB, body)

    def write(self, frame: bytes | bytearray | memoryview, *, ts: float | None = None,
              verdict: str | None = None, direction: str | None = None) -> None:
        """Append one frame (``ts`` defaults to now; ``verdict`` only kept in pcapng).

        ``direction`` is ``"in"`` (from the guest), ``"out"`` (to the guest) or None.

        >>> import tempfile, os
        >>> w = PcapWriter(os.path.join(tempfile.mkdtemp(), "x.pcap"))
        >>> w.write(b"abc", direction="sideways")
        Traceback (most recent call last):
        ...
        netstack.errors.PcapError: direction must be 'in', 'out' or None, got 'sideways'
        """
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise PcapError(f"frame must be bytes, got {type(frame).__name__}")
        if direction not in _DIRECTIONS:
            raise PcapError(f"direction must be 'in', 'out' or None, got {direction!r}")
        if verdict is not None and not isinstance(verdict, str):
            raise PcapError(f"verdict must be a str or None, got {type(verdict).__name__}")
        record = self._record(bytes(frame), time.time() if ts is None else ts, verdict,
                              direction)
        with self._lock:
            if self._file is None:
                raise PcapError(f"capture {str(self.path)!r} is closed")
            if self.max_bytes is not None and self.frames_written \
                    and self._size + len(record) > self.max_bytes \
                    and self._size > self._header_len:
                self._rotate()
            assert self._file is not None
            self._file.write(record)
            self._size += len(record)
            self.bytes_written += len(record)
            self.frames_written += 1

    def flush(self) -> None:
        """Flush buffered records to the file (readers see everything written so far).

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "f.pcap")
        >>> w = PcapWriter(path); w.write(bytes(60)); w.flush(); os.path.getsize(path)
        100
        """
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        """Flush and close (idempotent); later writes raise PcapError.

        >>> import tempfile, os
        >>> w = PcapWriter(os.path.join(tempfile.mkdtemp(), "c.pcap")); w.close(); w.close()
        """
        with self._lock:
            f, self._file = self._file, None
            if f is not None:
                f.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
