"""PcapWriter read back with dpkt (and tshark when installed)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
from pathlib import Path

import dpkt
import pytest

from netstack.errors import PcapError
from netstack.gateway import PcapWriter
from tests.support import require_binaries

pytestmark = pytest.mark.timeout(60)


def frame(i: int, size: int = 100) -> bytes:
    eth = dpkt.ethernet.Ethernet(
        dst=b"\x02\x6d\x73\x00\x00\x01", src=b"\x02\x6d\x73\x00\x00\x02",
        data=dpkt.ip.IP(src=bytes([172, 16, 0, 2]), dst=bytes([198, 51, 100, 10]),
                        p=dpkt.ip.IP_PROTO_UDP,
                        data=dpkt.udp.UDP(sport=40000, dport=9,
                                          data=struct.pack("!I", i).ljust(size, b"x"))))
    eth.data.len = len(eth.data)
    eth.data.data.ulen = len(eth.data.data)
    return bytes(eth)


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    with open(path, "rb") as f:
        return [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(f)]


def read_pcapng(path: Path) -> list[tuple[float, bytes, str | None, int | None]]:
    """(ts, frame, comment, epb_flags) per Enhanced Packet Block, parsed by dpkt."""
    data = path.read_bytes()
    out: list[tuple[float, bytes, str | None, int | None]] = []
    with open(path, "rb") as f:
        reader = dpkt.pcapng.Reader(f)
        assert reader.datalink() == dpkt.pcap.DLT_EN10MB
        frames = [(ts, bytes(buf)) for ts, buf in reader]
    pos, i = 0, 0
    while pos < len(data):
        btype, blen = struct.unpack_from("<II", data, pos)
        if btype == 6:
            epb = dpkt.pcapng.EnhancedPacketBlockLE(data[pos:pos + blen])
            opts = {o.code: o for o in epb.opts}
            comment = opts[1].text if 1 in opts else None
            flags = struct.unpack("<I", opts[2].data)[0] if 2 in opts else None
            out.append((frames[i][0], frames[i][1], comment, flags))
            assert bytes(epb.pkt_data) == frames[i][1]
            i += 1
        pos += blen
    assert i == len(frames)
    return out


def test_classic_pcap_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    with PcapWriter(path) as w:
        for i in range(10):
            w.write(frame(i), ts=1700000000.25 + i, verdict="ignored in pcap")
    pkts = read_pcap(path)
    assert [buf for _, buf in pkts] == [frame(i) for i in range(10)]
    assert pkts[3][0] == pytest.approx(1700000003.25)
    eth = dpkt.ethernet.Ethernet(pkts[0][1])
    assert eth.data.data.dport == 9
    assert w.frames_written == 10 and w.bytes_written == path.stat().st_size


def test_pcapng_comments_carry_the_verdict(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    with PcapWriter(path, format="pcapng") as w:
        w.write(frame(0), ts=1.5, verdict="allow rule 0: allow egress any", direction="in")
        w.write(frame(1, 101), ts=2.0, verdict="deny: default egress is deny ✓",
                direction="out")
        w.write(frame(2), ts=3.0)
    pkts = read_pcapng(path)
    assert [p[1] for p in pkts] == [frame(0), frame(1, 101), frame(2)]
    assert [p[2] for p in pkts] == ["allow rule 0: allow egress any",
                                    "deny: default egress is deny ✓", None]
    assert [p[3] for p in pkts] == [1, 2, None]
    assert pkts[0][0] == pytest.approx(1.5)


def test_snaplen_truncates_but_records_length(tmp_path: Path) -> None:
    path = tmp_path / "s.pcap"
    with PcapWriter(path, snaplen=64) as w:
        w.write(frame(0, 1000))
    raw = path.read_bytes()
    incl, orig = struct.unpack_from("<II", raw, 24 + 8)
    assert (incl, orig) == (64, len(frame(0, 1000)))
    assert read_pcap(path)[0][1] == frame(0, 1000)[:64]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_rotation_bounds_the_files(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"r.{fmt}"
    w = PcapWriter(path, format=fmt, max_bytes=4096, max_files=3)  # type: ignore[arg-type]
    for i in range(200):
        w.write(frame(i), verdict=f"v{i}")
    w.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [f"r.{fmt}", f"r.{fmt}.1", f"r.{fmt}.2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    read = read_pcap if fmt == "pcap" else read_pcapng
    kept = [p[1] for f in (files[2], files[1], files[0]) for p in read(f)]
    # the newest frames survive, contiguous and in order
    assert kept == [frame(i) for i in range(200 - len(kept), 200)]
    assert w.rotations > 3 and w.frames_written == 200


def test_threads_do_not_interleave_records(tmp_path: Path) -> None:
    path = tmp_path / "t.pcapng"
    w = PcapWriter(path, format="pcapng")

    def worker(base: int) -> None:
        for i in range(300):
            w.write(frame(base + i), verdict=f"t{base}")

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    got = read_pcapng(path)
    assert len(got) == 2400
    assert sorted(p[1] for p in got) == sorted(frame(k * 1000 + i) for k in range(8)
                                               for i in range(300))


def test_bad_arguments(tmp_path: Path) -> None:
    for kwargs, match in [({"format": "erf"}, "format"), ({"snaplen": 10}, "snaplen"),
                          ({"max_bytes": 100}, "max_bytes"), ({"max_files": 0}, "max_files")]:
        with pytest.raises(PcapError, match=match):
            PcapWriter(tmp_path / "x", **kwargs)  # type: ignore[arg-type]
    w = PcapWriter(tmp_path / "y.pcap")
    with pytest.raises(PcapError, match="bytes"):
        w.write("text")  # type: ignore[arg-type]
    w.close()
    with pytest.raises(PcapError, match="closed"):
        w.write(b"x" * 60)
    with pytest.raises(PcapError, match="cannot open"):
        PcapWriter(tmp_path / "y.pcap" / "sub")


def test_tshark_reads_verdicts(tmp_path: Path) -> None:
    if not shutil.which("tshark"):
        require_binaries("tshark")
    path = tmp_path / "k.pcapng"
    with PcapWriter(path, format="pcapng") as w:
        w.write(frame(7), verdict="deny rule 3")
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.comment",
                          "-e", "udp.dstport"], capture_output=True, text=True, timeout=60)
    assert "deny rule 3" in out.stdout and "9" in out.stdout
