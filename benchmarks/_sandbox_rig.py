"""Helpers for benchmarks/sandbox.py: the benchmark image, an upstream iperf3 namespace,
and per-process PSS of a sandbox.

The upstream is one network namespace ``mvbs-up`` reached from the host over a veth on
TEST-NET-1 (192.0.2.200/30); its loopback holds ``UPSTREAM_IP`` (TEST-NET-3), routed by
the host to the veth with a /32 route, where ``iperf3 -s`` listens. Sandboxes reach it
through their gateway and TAP uplink (the host masquerades their traffic out of the
veth). Everything is removed by :meth:`Upstream.close`, also after a failed setup.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import rootfs

UPSTREAM_NS = "mvbs-up"
HOST_VETH = "mvbsh"
NS_VETH = "mvbsn"
HOST_END = "192.0.2.201"
NS_END = "192.0.2.202"
UPSTREAM_IP = "203.0.113.77"


def busybox_root(dest: Path) -> Path:
    """A minimal root: the host's static busybox with every applet linked under /bin."""
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    bb = shutil.which("busybox")
    if bb is None:
        raise RuntimeError("the sandbox benchmark needs busybox (Debian: busybox-static)")
    shutil.copy2(bb, dest / "bin" / "busybox")
    applets = subprocess.run([bb, "--list"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.split()
    for a in applets:
        if a != "busybox" and not (dest / "bin" / a).exists():
            os.symlink("busybox", dest / "bin" / a)
    (dest / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc" / "group").write_text("root:x:0:\n")
    return dest


def add_dynamic_binary(root: Path, binary: str) -> Path | None:
    """Copy host executable ``binary`` and the libraries ``ldd`` names into ``root``
    (same paths); None when the host lacks it."""
    found = shutil.which(binary)
    if found is None:
        return None
    src = Path(found)
    out = subprocess.run(["ldd", str(src)], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    for f in [src, *(Path(p) for p in re.findall(r"(/\S+)\s+\(0x", out))]:
        dst = root / f.relative_to("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f.resolve(), dst)
    return Path("/") / src.relative_to("/")


def build_bench_image(work: Path, store: rootfs.ImageStore) -> tuple[rootfs.Image, str | None]:
    """The benchmark image (busybox + iperf3 with its libraries) and iperf3's guest path."""
    root = busybox_root(work / "bench-root")
    iperf = add_dynamic_binary(root, "iperf3")
    img = rootfs.build_image(root, "local/bench-sandbox:1", store,
                             config={"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]})
    return img, (str(iperf) if iperf else None)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Upstream:
    """An upstream namespace with ``iperf3 -s`` on :data:`UPSTREAM_IP` (needs root)."""

    def __init__(self) -> None:
        self.server: subprocess.Popen[bytes] | None = None
        self._cleanup()  # leftovers of an interrupted run
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        _ip("netns", "add", UPSTREAM_NS)
        _ip("link", "add", HOST_VETH, "type", "veth", "peer", "name", NS_VETH,
            "netns", UPSTREAM_NS)
        _ip("addr", "add", f"{HOST_END}/30", "dev", HOST_VETH)
        _ip("link", "set", HOST_VETH, "up")
        _ip("route", "add", f"{UPSTREAM_IP}/32", "via", NS_END, "dev", HOST_VETH)
        n = ["-n", UPSTREAM_NS]
        _ip(*n, "link", "set", "lo", "up")
        _ip(*n, "addr", "add", f"{UPSTREAM_IP}/32", "dev", "lo")
        _ip(*n, "addr", "add", f"{NS_END}/30", "dev", NS_VETH)
        _ip(*n, "link", "set", NS_VETH, "up")
        # no default route: the namespace only answers (to the on-link host end)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", UPSTREAM_NS, "iperf3", "-s", "-B", UPSTREAM_IP],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(200):
            ss = subprocess.run(["ip", "netns", "exec", UPSTREAM_NS, "ss", "-ltnH"],
                                capture_output=True, text=True, timeout=30).stdout
            if ":5201" in ss:
                return
            if self.server.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("iperf3 -s did not start in the upstream namespace")

    def _cleanup(self) -> None:
        _ip("route", "del", f"{UPSTREAM_IP}/32", check=False)
        _ip("link", "del", HOST_VETH, check=False)
        _ip("netns", "del", UPSTREAM_NS, check=False)

    def close(self) -> None:
        """Stop iperf3, delete the namespace, the veth and the route (idempotent)."""
        if self.server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, 9)
            self.server.wait(10)
            self.server = None
        self._cleanup()


# -- memory -----------------------------------------------------------------------------------
def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            pp = _ppid(int(p.name))
            if pp is not None:
                children.setdefault(pp, []).append(int(p.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (``/proc/PID/smaps_rollup``); 0 if gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def process_label(pid: int, root_pid: int) -> str:
    """``supervisor`` for the root, else the executable's name (qemu, virtiofsd, ...)."""
    if pid == root_pid:
        return "supervisor"
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "?"
    name = os.path.basename(exe)
    return "qemu" if name.startswith("qemu-system") else name


def pss_by_process(root_pid: int) -> dict[str, float]:
    """MiB of PSS per kind of process in the tree under ``root_pid`` (summed per label)."""
    out: dict[str, float] = {}
    for pid in descendants(root_pid):
        label = process_label(pid, root_pid)
        out[label] = out.get(label, 0.0) + pss_kib(pid) / 1024
    return {k: round(v, 1) for k, v in sorted(out.items())}


def qemu_pss_detail(pid: int) -> dict[str, float]:
    """MiB of QEMU's PSS by what it holds: ``guest_ram`` (the RAM memfd/file or the big
    anonymous block), ``tcg_cache`` (the rwx translation buffer), ``kernel_image`` (the
    mapped guest kernel, page cache shared by every QEMU booting it), ``other``."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    out = {"guest_ram": 0.0, "tcg_cache": 0.0, "kernel_image": 0.0, "other": 0.0}
    head = ""
    for line in text.splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            head = line
        elif line.startswith("Pss:"):
            kib = int(line.split()[1])
            fields = head.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            if "memfd:" in head or "microvm-ram" in head or (not path and hi - lo >= 64 << 20
                                                              and "x" not in fields[1]):
                key = "guest_ram"
            elif not path and "x" in fields[1]:
                key = "tcg_cache"
            elif path.endswith(".elf"):
                key = "kernel_image"
            else:
                key = "other"
            out[key] += kib / 1024
    return {k: round(v, 1) for k, v in out.items()}
