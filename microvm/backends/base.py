"""What every VMM backend shares: the VM spec, the ``Backend`` protocol, KVM detection, process hygiene.

Example::

    from microvm.backends import Disk, VmSpec, QemuBackend
    spec = VmSpec(kernel=Path("vendor/krunfw.elf"), disks=[Disk(Path("root.img"))],
                  rundir=Path("/tmp/vm1"))
    vm = QemuBackend().launch(spec)
    vm.wait(timeout=30)
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from microvm.errors import BackendUnavailable, BootError, MicrovmError

__all__ = [
    "ACCEL_CHOICES",
    "Backend",
    "Disk",
    "ProcessGroup",
    "Share",
    "SnapshotBackend",
    "SpawnedVm",
    "VmHandle",
    "VmSpec",
    "accel_override",
    "console_tail",
    "kvm_usable",
]

_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,36}$")


@dataclasses.dataclass(frozen=True)
class Disk:
    """A raw disk image attached as virtio-blk; the n-th disk is ``/dev/vd{a+n}`` in the guest.

    Example::

        Disk(Path("rootfs.ext4")), Disk(Path("layer.erofs"), readonly=True)
    """

    path: Path
    readonly: bool = False


@dataclasses.dataclass(frozen=True)
class Share:
    """A host directory exported to the guest over virtio-fs under ``tag``.

    Example::

        Share("data", Path("/srv/data"), readonly=True)
    """

    tag: str
    source: Path
    readonly: bool = False
    guest_path: str | None = None

    @property
    def mount_point(self) -> str:
        """Where the guest agent mounts the share (``guest_path`` or ``/mnt/<tag>``).

        Example::

            Share("data", Path("/srv")).mount_point  # "/mnt/data"
        """
        return self.guest_path or f"/mnt/{self.tag}"

    def __post_init__(self) -> None:
        if self.guest_path is not None and not self.guest_path.startswith("/"):
            raise MicrovmError(f"bad guest_path {self.guest_path!r}: must be absolute")
        if not _TAG_RE.match(self.tag):
            raise MicrovmError(
                f"bad virtio-fs tag {self.tag!r}: use 1-36 characters from [A-Za-z0-9_.-]"
            )


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """Everything a backend needs to start one guest.

    ``rundir`` receives ``console.log`` (hvc0) and ``agent.sock`` (the
    virtio-serial port named ``agent``); ``net_socket`` is a unix stream
    socket (u32-BE length-prefixed Ethernet frames) served by the caller.

    Example::

        VmSpec(kernel=k.elf, disks=[Disk(img)], rundir=Path("/tmp/vm"), cpus=2, memory_mib=512)
    """

    kernel: Path
    disks: Sequence[Disk]
    rundir: Path
    cpus: int = 1
    memory_mib: int = 512
    init: str = "/.microvm/agent"
    cmdline_extra: str = ""
    net_socket: Path | None = None
    mac: str = "02:00:00:00:00:02"
    shares: Sequence[Share] = ()
    kernel_library: Path | None = None
    console_limit: int = 4 << 20
    #: guest RAM in this file (QEMU ``memory-backend-file``): snapshots need it
    memory_file: Path | None = None
    #: map ``memory_file`` shared (the VM owns it) or private (copy on write of a snapshot)
    memory_shared: bool = True
    #: start paused, waiting for device state (``-incoming defer``): a snapshot restore
    incoming: bool = False
    #: open a QMP monitor at :attr:`qmp_socket` (pause, resume, snapshot)
    qmp: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.cpus, int) or not 1 <= self.cpus <= 32:
            raise MicrovmError(f"bad cpus {self.cpus!r}: use an integer from 1 to 32")
        if not isinstance(self.memory_mib, int) or not 64 <= self.memory_mib <= 65536:
            raise MicrovmError(f"bad memory_mib {self.memory_mib!r}: use 64 to 65536 MiB")
        if not self.disks:
            raise MicrovmError("a VM needs at least one disk (the root, /dev/vda)")
        if len(self.disks) > 8:
            raise MicrovmError(f"too many disks ({len(self.disks)}): at most 8")
        if not _MAC_RE.match(self.mac):
            raise MicrovmError(
                f"bad mac {self.mac!r}: use six lower-case hex pairs like 02:00:00:00:00:02"
            )
        if not self.init.startswith("/") or any(c.isspace() for c in self.init):
            raise MicrovmError(f"bad init {self.init!r}: an absolute guest path without spaces")
        sock = str(self.rundir / "agent.sock")
        if len(sock.encode()) > 107:
            raise MicrovmError(
                f"rundir {str(self.rundir)!r} is too long: unix socket paths under it exceed "
                "107 bytes; use a shorter directory"
            )
        if not isinstance(self.console_limit, int) or self.console_limit < 4096:
            raise MicrovmError(f"bad console_limit {self.console_limit!r}: at least 4096 bytes")
        tags = [s.tag for s in self.shares]
        if len(set(tags)) != len(tags):
            raise MicrovmError(f"duplicate virtio-fs tags in {tags}")

    @property
    def console_log(self) -> Path:
        """Path of the file receiving the guest console (hvc0).

        Example::

            print(spec.console_log.read_text())
        """
        return self.rundir / "console.log"

    @property
    def console_socket(self) -> Path:
        """Unix socket the VMM sends the console to (a :class:`ConsoleSink` caps the log).

        Example::

            spec.console_socket  # <rundir>/console.sock
        """
        return self.rundir / "console.sock"

    @property
    def qmp_socket(self) -> Path:
        """Unix socket of the VMM's QMP monitor (when :attr:`qmp` is set).

        Example::

            QmpClient.connect(spec.qmp_socket)
        """
        return self.rundir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        """Path of the unix socket bridged to the guest's ``agent`` port.

        Example::

            SyncAgentClient.connect_unix(spec.agent_socket)
        """
        return self.rundir / "agent.sock"

    def kernel_cmdline(self) -> str:
        """Kernel command line for a guest whose root is ``/dev/vda`` and whose PID 1 is ``init``.

        Example::

            spec.kernel_cmdline()  # 'console=hvc0 reboot=t panic=-1 root=/dev/vda rw init=/.microvm/agent quiet'
        """
        ro = "ro" if self.disks[0].readonly else "rw"
        parts = [
            "console=hvc0",
            "reboot=t",
            "panic=-1",
            "root=/dev/vda",
            ro,
            "rootwait",
            f"init={self.init}",
            "quiet",
        ]
        if self.cmdline_extra:
            parts.append(self.cmdline_extra)
        return " ".join(parts)


@runtime_checkable
class VmHandle(Protocol):
    """A running guest as seen by the host (the VMM process and its helpers).

    Example::

        code = handle.wait(timeout=10)   # None while still running
        handle.kill()
    """

    @property
    def pid(self) -> int:
        """PID of the VMM process.

        Example::

            os.kill(handle.pid, 0)
        """
        ...

    @property
    def spec(self) -> VmSpec:
        """The spec the guest was started with.

        Example::

            handle.spec.console_log
        """
        ...

    def poll(self) -> int | None:
        """Exit status of the VMM, or None while it runs.

        Example::

            handle.poll() is None  # still running
        """
        ...

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds for the VMM to exit; its exit status or None.

        Example::

            handle.wait(timeout=30)
        """
        ...

    def kill(self) -> None:
        """Kill the VMM and every helper it needed (idempotent).

        Example::

            handle.kill()
        """
        ...


@runtime_checkable
class Backend(Protocol):
    """A way to run a :class:`VmSpec`: ``QemuBackend``, ``LibkrunBackend`` or your own.

    Example::

        backend.check()            # raises BackendUnavailable with install hints
        handle = backend.launch(spec)
    """

    name: str

    def check(self) -> None:
        """Raise :class:`microvm.BackendUnavailable` unless this backend can run here.

        Example::

            QemuBackend().check()
        """
        ...

    def launch(self, spec: VmSpec) -> VmHandle:
        """Start the guest described by ``spec``; returns at once (the guest boots meanwhile).

        Example::

            handle = QemuBackend().launch(spec)
        """
        ...


@runtime_checkable
class SnapshotBackend(Protocol):
    """A backend that can pause a guest and save/restore it (QEMU; libkrun cannot).

    :class:`microvm.Machine` checks for it and raises :class:`BackendUnavailable`
    ("snapshots need the QEMU backend") otherwise.

    Example::

        if isinstance(backend, SnapshotBackend):
            backend.save_state(handle, state_file)
    """

    def pause(self, handle: VmHandle) -> None:
        """Stop the guest's vCPUs (the VMM keeps running).

        Example::

            backend.pause(handle)
        """
        ...

    def resume(self, handle: VmHandle) -> None:
        """Let a paused guest run again.

        Example::

            backend.resume(handle)
        """
        ...

    def save_state(self, handle: VmHandle, state: Path, *, include_ram: bool) -> None:
        """Pause the guest and write its device state (and RAM when ``include_ram``:
        a guest whose RAM is not in a shared ``memory_file``) to ``state``; it stays paused.

        Example::

            backend.save_state(handle, Path("snap/state"), include_ram=False)
        """
        ...

    def load_state(self, handle: VmHandle, state: Path, *, include_ram: bool) -> None:
        """Feed ``state`` to a VMM launched with ``spec.incoming`` and let it run.

        Example::

            backend.load_state(backend.launch(spec), Path("snap/state"), include_ram=False)
        """
        ...


def prepare_rundir(spec: VmSpec) -> None:
    """Check the spec's disks exist, create its rundir and clear a previous run's files.

    Every backend calls this first in ``launch``: stale agent sockets and console logs
    of an earlier machine in the same rundir are removed and an empty log is created.

    Example::

        prepare_rundir(spec)   # raises BootError naming a missing disk image
    """
    for d in spec.disks:
        if not d.path.is_file():
            raise BootError(f"disk image {str(d.path)!r} does not exist")
    spec.rundir.mkdir(parents=True, exist_ok=True)
    for stale in (spec.agent_socket, spec.console_log):
        if stale.exists():
            stale.unlink()
    spec.console_log.touch()


ACCEL_CHOICES = ("tcg", "kvm")


def accel_override() -> str | None:
    """``MICROVM_ACCEL`` validated: ``"tcg"``, ``"kvm"`` or None when unset/empty.

    Raises :class:`microvm.BackendUnavailable` naming the bad value and the allowed ones.

    Example::

        os.environ["MICROVM_ACCEL"] = "tcg"
        accel_override()  # 'tcg'
    """
    raw = os.environ.get("MICROVM_ACCEL", "")
    value = raw.strip().lower()
    if not value:
        return None
    if value not in ACCEL_CHOICES:
        raise BackendUnavailable(
            f"MICROVM_ACCEL={raw!r} is not valid: use 'tcg' or 'kvm' (or leave it unset)"
        )
    return value


def kvm_usable() -> bool:
    """True when /dev/kvm is real hardware virtualization (vmx/svm, not nested PVM).

    ``MICROVM_ACCEL=tcg`` forces False; ``MICROVM_ACCEL=kvm`` forces True (the QEMU
    backend still probes that KVM can run a guest before using it); any other value
    raises :class:`microvm.BackendUnavailable`.

    Example::

        accel = "kvm" if kvm_usable() else "tcg"
    """
    forced = accel_override()
    if forced is not None:
        return forced == "kvm"
    if os.path.exists("/sys/module/kvm_pvm"):
        return False
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" in flags or "svm" in flags
    except OSError:
        return False
    return False


def console_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a console log (empty if missing).

    Example::

        print(console_tail(spec.console_log))
    """
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


_LIVE: weakref.WeakSet[ProcessGroup] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _kill_all_at_exit() -> None:
    with _LIVE_LOCK:
        groups = list(_LIVE)
    for g in groups:
        g.kill()


atexit.register(_kill_all_at_exit)


def pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` when util-linux's setpriv exists (child dies with its parent thread).

    Example::

        subprocess.Popen([*pdeathsig_prefix(), "qemu-system-x86_64", ...])
    """
    for p in ("/usr/bin/setpriv", "/bin/setpriv"):
        if os.access(p, os.X_OK):
            return [p, "--pdeathsig", "KILL", "--"]
    return []


_keeper_lock = threading.Lock()
_keeper_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _spawn_on_keeper_thread(
    fn: Callable[[], subprocess.Popen[bytes]],
) -> subprocess.Popen[bytes]:
    """Run ``fn`` (a Popen) on one long-lived thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
    children are always forked from this thread, which lives as long as the
    process: a VM started from a short-lived worker thread survives it, and
    still dies with the process.
    """
    global _keeper_pool
    with _keeper_lock:
        if _keeper_pool is None:
            _keeper_pool = concurrent.futures.ThreadPoolExecutor(1, "microvm-spawner")
        pool = _keeper_pool
    return pool.submit(fn).result()


class ProcessGroup:
    """Child processes, each in its own process group, killed together (also at exit and on GC).

    Example::

        g = ProcessGroup()
        p = g.spawn(["sleep", "100"], log=Path("/tmp/x.log"))
        g.kill()
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._finalizer = weakref.finalize(self, _kill_procs, self.procs)

    def spawn(
        self, argv: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session, stdin from /dev/null, output appended to ``log``.

        Example::

            g.spawn(["sleep", "60"], log=Path("/tmp/sleep.log"))
        """
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            p = _spawn_on_keeper_thread(
                lambda: subprocess.Popen(
                    [*pdeathsig_prefix(), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    env=env,
                )
            )
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        with self._lock:
            self.procs.append(p)
        return p

    def kill(self) -> None:
        """SIGKILL every process group and reap them (idempotent).

        Example::

            g.kill()
        """
        with self._lock:
            _kill_procs(self.procs)


def _kill_procs(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def wait_for_path(path: Path, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll until ``path`` exists (False on timeout or if ``alive`` exits first).

    Example::

        wait_for_path(Path("/tmp/vfs.sock"), 5.0, proc)
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if alive is not None and alive.poll() is not None:
            return False
        time.sleep(0.005)
    return path.exists()


class SpawnedVm:
    """A guest whose VMM runs as a child process (QEMU, or the libkrun launcher) plus helpers.

    Example::

        vm = QemuBackend().launch(spec)
        vm.wait(timeout=30) or vm.kill()
    """

    def __init__(
        self,
        spec: VmSpec,
        group: ProcessGroup,
        proc: subprocess.Popen[bytes],
        closers: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._spec = spec
        self._group = group
        self._proc = proc
        self._closers = list(closers)

    def _close_helpers(self) -> None:
        closers, self._closers = self._closers, []
        for c in closers:
            with contextlib.suppress(Exception):
                c()

    @property
    def pid(self) -> int:
        """PID of the VMM process (setpriv execs into it, so this is the VMM itself).

        Example::

            vm.pid
        """
        return self._proc.pid

    @property
    def spec(self) -> VmSpec:
        """The spec this guest runs.

        Example::

            vm.spec.rundir
        """
        return self._spec

    @property
    def helper_pids(self) -> list[int]:
        """PIDs of every process started for this guest (VMM and helpers such as virtiofsd).

        Example::

            vm.helper_pids  # [qemu_pid, virtiofsd_pid]
        """
        return [p.pid for p in self._group.procs]

    def poll(self) -> int | None:
        """The VMM's exit status, or None while it runs.

        Example::

            vm.poll() is None
        """
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the VMM to exit (then stop the helpers); None on timeout.

        Example::

            vm.wait(timeout=30)
        """
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._group.kill()
        self._close_helpers()
        return code

    def kill(self) -> None:
        """SIGKILL the VMM and helpers (whole process groups) and reap them (idempotent).

        Example::

            vm.kill()
        """
        self._group.kill()
        self._close_helpers()
