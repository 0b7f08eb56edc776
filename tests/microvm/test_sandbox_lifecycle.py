"""``microvm.Sandbox`` end to end with real guests (QEMU; TCG here): patches, volumes,
detached/attached lifecycles across processes, timers, ``replace``, crash reporting,
labels, 20 create/remove cycles that leave nothing behind and the async flavour (the sync
twin's signatures: test_sync_twins.py).

The module runs with its own ``MICROVM_HOME`` and its own ``TMPDIR`` (the supervisors,
QEMU and virtiofsd inherit both), so every leftover check can be exact. Sandbox names
carry a random prefix: the network objects of a sandbox are named after it, and other
suites may run sandboxes on this host at the same time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets as _secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import rootfs
from microvm import AsyncSandbox, Sandbox
from microvm.errors import AgentError, SandboxExists, SandboxNotFound, SandboxNotRunning
from microvm.kernel import Kernel
from microvm.sandbox import AsyncExecHandle
from microvm.sandbox._paths import SandboxPaths
from microvm.sandbox._state import process_alive
from rootfs import Patch
from tests.support import require_binaries

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

IMAGE_REF = "local/lifecycle-busybox:1"
ROOT = os.geteuid() == 0


@dataclass
class Env:
    """The module's private world."""

    home: Path
    tmp: Path
    image: rootfs.Image
    prefix: str

    def name(self, what: str) -> str:
        """A sandbox name unique to this run."""
        return f"{self.prefix}-{what}"

    def child_env(self) -> dict[str, str]:
        """The environment for a second Python process talking to the same sandboxes."""
        return {**os.environ, "MICROVM_HOME": str(self.home), "TMPDIR": str(self.tmp),
                "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


@pytest.fixture(scope="module")
def env(kernel: Kernel, busybox_root: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_binaries("qemu-system-x86_64", "mkfs.ext4")
    # a long home: the sandboxes' runtime directories move to $TMPDIR/mvsb-* (socket paths)
    home = tmp_path_factory.mktemp("sandbox-lifecycle-home-long-enough-for-mvsb-rundirs")
    tmp = Path(tempfile.mkdtemp(prefix="mvlc-tmp-", dir="/tmp"))
    saved = {k: os.environ.get(k) for k in ("MICROVM_HOME", "TMPDIR")}
    saved_tempdir = tempfile.tempdir
    os.environ["MICROVM_HOME"] = str(home)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    try:
        image = rootfs.build_image(
            busybox_root, IMAGE_REF, rootfs.ImageStore(),
            config={"Cmd": ["/bin/sh", "-c", "echo default:$GREETING:$(pwd)"],
                    "Env": ["PATH=/bin", "GREETING=from-image"], "WorkingDir": "/root"})
        yield Env(home, tmp, image, "lc" + _secrets.token_hex(2))
    finally:
        for info in Sandbox.list():
            try:
                Sandbox.remove(info.name, timeout=5)
            except Exception as e:   # best effort: report and go on
                print(f"cleanup of sandbox {info.name} failed: {e}", file=sys.stderr)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture()
def cleanup(env: Env) -> Iterator[Callable[[str], str]]:
    """Register sandbox names to remove when the test ends, pass or fail."""
    names: list[str] = []

    def add(name: str) -> str:
        names.append(name)
        return name

    yield add
    for n in names:
        try:
            Sandbox.remove(n, timeout=5)
        except SandboxNotFound:
            pass


# -- helpers --------------------------------------------------------------------------------
def _proc_text(pid: str, what: str) -> str:
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes().replace(b"\0", b"\n").decode(
            errors="replace")
    except OSError:
        return ""


def owned_processes(env: Env, needles: list[str] | None = None) -> dict[int, str]:
    """Live processes that belong to this module's sandboxes: without ``needles``, those whose
    environment carries our MICROVM_HOME or TMPDIR or whose command line names either;
    with ``needles``, those whose command line names one of them."""
    marks = {f"MICROVM_HOME={env.home}", f"TMPDIR={env.tmp}"} if needles is None else set()
    needles = needles if needles is not None else [str(env.home), str(env.tmp)]
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        stat = _proc_text(d, "stat")
        if not stat or stat[stat.rfind(")") + 2:stat.rfind(")") + 3] == "Z":
            continue
        cmd = _proc_text(d, "cmdline")
        envs = set(_proc_text(d, "environ").split("\n"))
        if marks & envs or any(n in cmd for n in needles):
            out[int(d)] = cmd.replace("\n", " ").strip()
    return out


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's children)."""
    kids: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            kids += [int(c) for c in _proc_text(f"{pid}/task/{t}", "children").split()]
    except OSError:
        pass
    return kids


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def assert_gone(sb_name: str, pid: int | None, kids: list[int]) -> None:
    """The supervisor ``pid`` and its children (QEMU, virtiofsd) are gone."""
    for p in [pid, *kids]:
        if p:
            wait_until(lambda p=p: not process_alive(p, None),  # type: ignore[misc]
                       20, f"pid {p} of {sb_name} to exit")


def run_child(env: Env, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a second Python process against the same MICROVM_HOME."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env.child_env(), timeout=timeout, cwd=str(env.tmp))
    assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def mounts_mentioning(env: Env) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln for ln in f if str(env.home) in ln or str(env.tmp) in ln]


# -- 1: patches and volumes ------------------------------------------------------------------
def test_patches_volumes_and_named_volume_surviving_recreate(
        env: Env, cleanup: Callable[[str], str], tmp_path: Path) -> None:
    name = cleanup(env.name("vol"))
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "ro.txt").write_text("read only\n")
    vol = f"{env.prefix}-cache"
    volumes = {"/data": str(rw), "/ro": {"host": str(ro), "readonly": True},
               "/cache": {"named": vol}}
    patches = [Patch.text("/etc/motd", "patched motd\n"),
               Patch.text("/opt/app/run.sh", "#!/bin/sh\necho app ran\n", mode=0o755)]
    labels = {"suite": env.prefix, "case": "vol"}
    sb = Sandbox.create(name, image=env.image, network="none", patches=patches,
                        volumes=volumes, labels=labels, memory=256)
    try:
        assert sb.state == "running"
        # patches
        assert sb.exec("/bin/cat", ["/etc/motd"]).stdout_text == "patched motd\n"
        assert sb.exec("/opt/app/run.sh").stdout_text == "app ran\n"
        # the image's config: default command with its env and workdir
        assert sb.exec_default().stdout_text == "default:from-image:/root\n"
        # host -> guest and guest -> host through the read-write volume
        (rw / "from-host.txt").write_text("hello guest\n")
        assert sb.exec("/bin/cat", ["/data/from-host.txt"]).stdout_text == "hello guest\n"
        out = sb.shell("echo hello host > /data/from-guest.txt && mkdir -p /data/sub && "
                       "echo deep > /data/sub/f && sync")
        assert out.success, out.stderr_text
        assert (rw / "from-guest.txt").read_text() == "hello host\n"
        assert (rw / "sub" / "f").read_text() == "deep\n"
        # read-only: readable, any write refused in the guest, nothing reaches the host
        assert sb.exec("/bin/cat", ["/ro/ro.txt"]).stdout_text == "read only\n"
        for script in ("echo x > /ro/new.txt", "echo x >> /ro/ro.txt", "rm /ro/ro.txt",
                       "mkdir /ro/d"):
            r = sb.shell(script)
            assert not r.success, script
        assert sorted(os.listdir(ro)) == ["ro.txt"] and (ro / "ro.txt").read_text() == "read only\n"
        assert "ro" in sb.shell("grep ' /ro ' /proc/mounts").stdout_text.split()[3].split(",")
        # named volume: lives under $MICROVM_HOME/volumes/<name>
        assert sb.shell("echo kept > /cache/keep.txt && echo gone > /root/scratch && sync").success
        assert (env.home / "volumes" / vol / "keep.txt").read_text() == "kept\n"
        # labels
        assert [i.name for i in Sandbox.list(labels=labels)] == [name]
        assert name in [i.name for i in Sandbox.list(labels={"suite": env.prefix})]
        assert Sandbox.list(labels={"suite": env.prefix, "case": "other"}) == []
        assert Sandbox.list(labels={"suite": "nope"}) == []
        info = sb.info()
        assert info.labels == labels and info.state == "running" and info.pid
    finally:
        sb.close()
    Sandbox.remove(name)
    with pytest.raises(SandboxNotFound):
        Sandbox.get(name)
    assert (env.home / "volumes" / vol / "keep.txt").read_text() == "kept\n"
    # recreate: same name, same named volume; the old disk is gone, the volume is not
    sb = Sandbox.create(name, image=env.image, network="none", memory=256,
                        volumes={"/cache": {"named": vol}}, labels=labels)
    try:
        assert sb.exec("/bin/cat", ["/cache/keep.txt"]).stdout_text == "kept\n"
        assert not sb.fs.exists("/root/scratch")
        assert not sb.fs.exists("/data/from-host.txt")
    finally:
        sb.close()
    Sandbox.remove(name)
    assert (env.home / "volumes" / vol / "keep.txt").exists()


# -- 2: detached across processes, attached dies with its creator ---------------------------
def test_detached_sandbox_outlives_its_creator_and_is_reattached(
        env: Env, cleanup: Callable[[str], str]) -> None:
    name = cleanup(env.name("det"))
    created = run_child(env, f"""
from microvm import Sandbox
sb = Sandbox.create({name!r}, image={IMAGE_REF!r}, pull_policy="never", network="none",
                    memory=256, detached=True, labels={{"suite": {env.prefix!r}}})
sb.shell("echo from-creator > /root/mark; echo '<3>lc-console-mark' > /dev/kmsg")
print(sb.info().pid)
""")
    sup_pid = int(created.stdout.split()[-1])
    info = Sandbox.get(name).info()
    assert info.state == "running" and info.pid == sup_pid and process_alive(sup_pid, None)
    kids = children_of(sup_pid)
    assert kids, "the supervisor runs QEMU as its child"
    reattached = run_child(env, f"""
from microvm import Sandbox
sb = Sandbox.get({name!r})
print(sb.state)
print(sb.shell("cat /root/mark; echo $((6 * 7))").stdout_text, end="")
print("log:", "lc-console-mark" in sb.logs())
sb.stop()
print(sb.state)
""")
    assert reattached.stdout.split("\n")[:5] == ["running", "from-creator", "42", "log: True",
                                                  "stopped"]
    info = Sandbox.get(name).info()
    assert info.state == "stopped" and info.error == "requested"
    assert_gone(name, sup_pid, kids)
    with pytest.raises(SandboxNotRunning) as ei:
        Sandbox.get(name).exec("/bin/true")
    assert ei.value.state == "stopped"


def test_attached_sandbox_dies_with_its_creating_process(
        env: Env, cleanup: Callable[[str], str]) -> None:
    name = cleanup(env.name("att"))
    created = run_child(env, f"""
from microvm import Sandbox
sb = Sandbox.create({name!r}, image={IMAGE_REF!r}, pull_policy="never", network="none",
                    memory=256)
assert sb.shell("true").success
print(sb.info().pid)
""")  # the child exits without stop(): its supervisor's lifeline closes
    sup_pid = int(created.stdout.split()[-1])
    wait_until(lambda: Sandbox.get(name).state != "running", 60, "the sandbox to stop")
    info = Sandbox.get(name).info()
    assert info.state == "stopped", info.error
    assert "creating process exited" in info.error
    assert_gone(name, sup_pid, [])
    paths = SandboxPaths.of(name)
    assert owned_processes(env, [str(paths.dir), str(paths.run)]) == {}


# -- 3: timers ----------------------------------------------------------------------------------
def test_max_duration_stops_the_sandbox(env: Env, cleanup: Callable[[str], str]) -> None:
    name = cleanup(env.name("maxd"))
    sb = Sandbox.create(name, image=env.image, network="none", memory=256, max_duration=3)
    try:
        assert sb.wait(timeout=90) == "stopped"
        info = sb.info()
        assert "max_duration of 3s reached" in info.error
        assert info.stopped is not None and info.stopped - info.created >= 3
        assert_gone(name, info.pid, [])
    finally:
        sb.close()


def test_idle_timeout_stops_an_idle_sandbox_not_a_busy_one(
        env: Env, cleanup: Callable[[str], str]) -> None:
    name = cleanup(env.name("idle"))
    sb = Sandbox.create(name, image=env.image, network="none", memory=256, idle_timeout=3)
    try:
        # an exec lasting twice the idle timeout keeps the sandbox alive
        out = sb.exec("/bin/sh", ["-c", "sleep 6; echo still-here"])
        assert out.stdout_text == "still-here\n"
        assert sb.state == "running"
        assert sb.wait(timeout=90) == "stopped"
        assert "idle for 3s (idle_timeout)" in sb.info().error
        assert_gone(name, sb.info().pid, [])
    finally:
        sb.close()


# -- 4: replace ----------------------------------------------------------------------------------
def test_replace_stops_the_same_name_first(env: Env, cleanup: Callable[[str], str]) -> None:
    name = cleanup(env.name("repl"))
    first = Sandbox.create(name, image=env.image, network="none", memory=256, detached=True,
                           labels={"gen": "1"})
    try:
        first.shell("echo one > /root/gen")
        pid1 = first.info().pid
        kids1 = children_of(pid1 or 0)
        with pytest.raises(SandboxExists, match=re.escape(repr(name))):
            Sandbox.create(name, image=env.image, network="none", memory=256)
        # the refused create touched nothing
        assert first.state == "running" and first.info().labels == {"gen": "1"}
        assert first.exec("/bin/cat", ["/root/gen"]).stdout_text == "one\n"
    finally:
        first.close()
    second = Sandbox.create(name, image=env.image, network="none", memory=256, replace=True,
                            replace_with_timeout=5, labels={"gen": "2"})
    try:
        assert_gone(name, pid1, kids1)
        info = second.info()
        assert info.state == "running" and info.pid != pid1 and info.labels == {"gen": "2"}
        assert not second.fs.exists("/root/gen")          # a fresh disk
        assert [i.name for i in Sandbox.list(labels={"gen": "1"})] == []
    finally:
        second.close()


# -- 5: crashes ----------------------------------------------------------------------------------
#: a real kernel panic from user space: the kernel here has no sysrq, and PID 1's death
#: powers the guest off (libkrunfw's kernel); an OOM with panic_on_oom set does panic
PANIC_SCRIPT = ("echo 1 > /proc/sys/vm/panic_on_oom && mkdir -p /mnt/oom && "
                "mount -t tmpfs -o size=100% oom /mnt/oom && "
                "dd if=/dev/zero of=/mnt/oom/fill bs=1M")


def test_guest_panic_is_reported_as_crashed(env: Env, cleanup: Callable[[str], str]) -> None:
    name = cleanup(env.name("panic"))
    sb = Sandbox.create(name, image=env.image, network="none", memory=256)
    try:
        pid = sb.info().pid
        kids = children_of(pid or 0)
        with pytest.raises(AgentError):
            sb.shell(PANIC_SCRIPT, timeout=120)
        assert sb.wait(timeout=60) == "crashed"
        info = sb.info()
        assert "the guest kernel panicked" in info.error
        assert "Kernel panic" in info.error and "Out of memory" in info.error
        with pytest.raises(SandboxNotRunning) as ei:
            sb.exec("/bin/true")
        assert ei.value.state == "crashed"
        assert "Kernel panic" in ei.value.console_tail
        assert "crashed" in str(ei.value) and "\n" not in str(ei.value)
        assert "Kernel panic" in sb.logs(tail=10)
        assert_gone(name, pid, kids)
    finally:
        sb.close()


def test_sigkilled_supervisor_reads_back_as_crashed(
        env: Env, cleanup: Callable[[str], str]) -> None:
    name = cleanup(env.name("kill9"))
    sb = Sandbox.create(name, image=env.image, network="none", memory=256, detached=True)
    try:
        info = sb.info()
        assert info.state == "running" and info.pid
        kids = children_of(info.pid)
        assert kids
        os.kill(info.pid, signal.SIGKILL)
        wait_until(lambda: not process_alive(info.pid, None), 20, "the supervisor to die")
        # never a phantom "running": any reader sees it crashed
        listed = {i.name: i for i in Sandbox.list()}
        assert listed[name].state == "crashed"
        assert f"the supervisor (pid {info.pid}) died" in listed[name].error
        assert Sandbox.get(name).state == "crashed"
        assert_gone(name, None, kids)        # QEMU dies with its supervisor
        with pytest.raises(SandboxNotRunning) as ei:
            sb.exec("/bin/true")
        assert ei.value.state == "crashed"
    finally:
        sb.close()
    Sandbox.remove(name)
    paths = SandboxPaths.of(name)
    assert not paths.dir.exists() and not paths.run.exists()


# -- 6: lookups ------------------------------------------------------------------------------------
def test_missing_names(env: Env) -> None:
    with pytest.raises(SandboxNotFound, match="'missing'"):
        Sandbox.get("missing")
    with pytest.raises(SandboxNotFound):
        Sandbox.remove(env.name("never-created"))
    with pytest.raises(SandboxNotFound):
        Sandbox.start(env.name("never-created"))


# -- 7: nothing left behind ------------------------------------------------------------------------
def _home_leftovers(home: Path) -> list[str]:
    """Files under $MICROVM_HOME that a removed sandbox must not leave. Allowed to stay:
    the image store (images/**, minus prepared roots), named volumes, the interception CA
    (tls/), the cached agent boot disk (boot/agent-*.ext4 and its lock), the slot lock
    files (net/slots/N.lock), the state database (sandboxes.db*), and the empty
    sandboxes/ and net/uplinks/ directories."""
    exact = {"images", "boot", "net", "net/slots", "net/uplinks", "sandboxes", "volumes",
             "tls", "sandboxes.db", "sandboxes.db-wal", "sandboxes.db-shm"}
    patterns = (r"(images|volumes|tls)/.*", r"boot/agent-[0-9a-f]+\.ext4(\.lock)?",
                r"net/slots/\d+\.lock")
    bad = []
    for dirpath, dirnames, filenames in os.walk(home):
        rel_dir = Path(dirpath).relative_to(home)
        for entry in [*dirnames, *filenames]:
            rel = (rel_dir / entry).as_posix()
            allowed = rel in exact or any(re.fullmatch(p, rel) for p in patterns)
            if not allowed or rel.startswith("images/prepared/"):
                bad.append(rel)
    return sorted(bad)


@pytest.mark.slow
def test_twenty_create_remove_cycles_leave_nothing_behind(
        env: Env, cleanup: Callable[[str], str], tmp_path: Path) -> None:
    assert Sandbox.list() == [], "earlier tests left sandboxes"
    vol = tmp_path / "share"
    vol.mkdir()
    procs_before = owned_processes(env)
    mounts_before = mounts_mentioning(env)
    if ROOT:
        from tests.netstack_gateway.kernel_objects import snapshot

        objects_before = snapshot()
    names: list[str] = []
    networked: list[str] = []
    for i in range(20):
        name = cleanup(env.name(f"cyc{i}"))
        names.append(name)
        network = "public_only" if ROOT and i % 5 == 4 else "none"
        if network != "none":
            networked.append(name)
        kw: dict[str, Any] = {}
        if i % 4 == 1:           # a host volume: a virtiofsd to clean up as well
            kw["volumes"] = {"/share": str(vol)}
        sb = Sandbox.create(name, image=env.image, network=network, memory=256,
                            detached=i % 2 == 0, patches=[Patch.text("/etc/cycle", f"{i}\n")],
                            **kw)
        try:
            assert sb.exec("/bin/cat", ["/etc/cycle"]).stdout_text == f"{i}\n"
            if network != "none":
                assert "eth0" in sb.shell("ls /sys/class/net").stdout_text
            pid = sb.info().pid
            kids = children_of(pid or 0)
            if i < 2:   # the leak detector sees a live sandbox's processes (not vacuous)
                p = SandboxPaths.of(name)
                assert pid and kids and {pid, *kids} <= set(owned_processes(env))
                assert {pid, *kids} <= set(owned_processes(env, [str(p.dir), str(p.run)]))
        finally:
            sb.close()
        Sandbox.remove(name)
        assert_gone(name, pid, kids)
    assert Sandbox.list() == []
    # processes: none of ours beyond those that ran before (none, normally)
    wait_until(lambda: set(owned_processes(env)) <= set(procs_before), 20,
               f"sandbox processes to exit: {owned_processes(env)}")
    for n in names:
        p = SandboxPaths.of(n)
        assert owned_processes(env, [str(p.dir), str(p.run)]) == {}, n
        assert not p.dir.exists() and not p.run.exists(), n
    # mounts, files, temp dir
    assert mounts_mentioning(env) == mounts_before
    assert _home_leftovers(env.home) == []
    assert sorted(os.listdir(env.home / "sandboxes")) == []
    assert [p for p in os.listdir(env.tmp) if p.startswith(("mvsb-", "microvm-"))] == []
    assert os.listdir(env.tmp) == []
    # network objects: namespaces, links, nft tables named after our sandboxes
    if ROOT:
        from netstack.gateway import uplink_names
        from tests.netstack_gateway.kernel_objects import snapshot

        after = snapshot()
        for n in networked:
            u = uplink_names(n)
            assert u["netns"] not in after.netns, n
            assert {u["tap"], u["host_veth"], u["ns_veth"]}.isdisjoint(after.links), n
            assert u["nft_table"] not in after.nft_tables, n
        tokens = {uplink_names(n)["token"] for n in names}
        for kind, objs in after.ours().items():
            new = {o for o in objs - objects_before.ours()[kind] if any(t in o for t in tokens)}
            assert new == set(), (kind, new)
        assert list((env.home / "net" / "uplinks").glob("*")) == []     # no uplink records


# -- 8: the async flavour ---------------------------------------------------------------------------
def test_async_sandbox(env: Env, cleanup: Callable[[str], str], tmp_path: Path) -> None:
    name = cleanup(env.name("async"))
    big = os.urandom(10 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    back = tmp_path / "back.bin"

    async def main() -> int | None:
        sb = await AsyncSandbox.create(name, image=env.image, network="none", memory=256,
                                       env={"SANDBOX_VAR": "sv"})
        async with sb:
            pid = sb.info().pid
            out = await sb.exec("/bin/sh", ["-c", "echo $SANDBOX_VAR:$X; echo err >&2; exit 3"],
                                env={"X": "x"})
            assert (out.exit_code, out.stdout_text, out.stderr_text, out.success) == \
                (3, "sv:x\n", "err\n", False)
            assert (await sb.shell("pwd", cwd="/tmp")).stdout_text == "/tmp\n"
            assert (await sb.exec("/bin/cat", stdin="piped")).stdout == b"piped"
            # streamed exec: stdin writer, events, wait
            h = await sb.exec_stream("/bin/sh", ["-c", "cat; echo done >&2; exit 5"])
            assert isinstance(h, AsyncExecHandle) and h.pid > 0
            await h.stdin.write(b"abc")
            await h.stdin.write("def\n")
            await h.stdin.close()
            kinds, stdout, stderr = [], b"", b""
            async for ev in h.events():
                kinds.append(ev.kind)
                if ev.kind == "stdout":
                    stdout += ev.data
                elif ev.kind == "stderr":
                    stderr += ev.data
            assert (stdout, stderr) == (b"abcdef\n", b"done\n")
            assert kinds[-1] == "exited"
            assert (await h.wait(timeout=30)).exit_code == 5
            # kill a streamed exec
            h2 = await sb.exec_stream("/bin/sleep", ["60"])
            await h2.kill()
            assert (await h2.wait(timeout=30)).signal == signal.SIGKILL
            # files
            fs = sb.fs
            assert await fs.write("/work/a/b.txt", "hello", mkdirs=True) == 5
            assert await fs.read("/work/a/b.txt") == b"hello"
            assert await fs.read_text("/work/a/b.txt") == "hello"
            await fs.mkdir("/work/x/y", parents=True)
            assert sorted(e.name for e in await fs.list("/work")) == ["a", "x"]
            st = await fs.stat("/work/a/b.txt")
            assert st.size == 5
            assert (await fs.stat("/work/x")).type == "dir"
            await fs.rename("/work/a/b.txt", "/work/a/c.txt")
            assert not await fs.exists("/work/a/b.txt") and await fs.exists("/work/a/c.txt")
            await fs.copy("/work/a/c.txt", "/work/x/y/d.txt")
            assert await fs.read_text("/work/x/y/d.txt") == "hello"
            await fs.copy("/work/a", "/work/a2", recursive=True)
            assert await fs.read_text("/work/a2/c.txt") == "hello"
            await fs.remove("/work/a/c.txt")
            assert not await fs.exists("/work/a/c.txt")
            await fs.remove("/work", recursive=True)
            assert not await fs.exists("/work")
            with pytest.raises(AgentError) as ei:
                await fs.read("/no/such/file")
            assert ei.value.errno_name == "ENOENT"
            # 10 MiB each way, streamed
            assert await fs.copy_from_host(src, "/tmp/big.bin") == len(big)
            sha = (await sb.exec("/bin/sha256sum", ["/tmp/big.bin"])).stdout_text.split()[0]
            assert sha == hashlib.sha256(big).hexdigest()
            assert await fs.copy_to_host("/tmp/big.bin", back) == len(big)
            assert back.read_bytes() == big
            m = await sb.metrics()
            assert m["uptime_ms"] > 0
        return pid

    pid = asyncio.run(main())
    # ``async with`` stopped and removed the non-detached sandbox
    with pytest.raises(SandboxNotFound):
        Sandbox.get(name)
    assert not process_alive(pid, None)
    assert not SandboxPaths.of(name).dir.exists()


# -- 9: the sync twin: tests/microvm/test_sync_twins.py (no guest needed) ---------------------
