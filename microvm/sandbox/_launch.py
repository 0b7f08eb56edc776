"""The creator's side of a sandbox's start: resolve the image, prepare the root, write
``launch.json``, spawn the supervisor and wait for its one-line report.

Everything that can be checked is checked before the slow work (pull, prepare, boot);
a failed start leaves nothing behind (no record, no directory, no process).

Example::

    report = await spawn_supervisor(paths, launch, secrets, detached=False)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from microvm import errors
from microvm.sandbox._config import SandboxConfig
from microvm.sandbox._paths import SandboxPaths
from rootfs import (
    Image,
    ImageStore,
    Patch,
    PreparedRoot,
    RegistryAuth,
    RootfsError,
    RootProvider,
    prepare_bind_root,
)

if TYPE_CHECKING:
    from tls_proxy import Secret

__all__ = ["ImageDefaults", "PreparedLaunch", "prepare_launch", "spawn_supervisor"]

#: supervisors of attached sandboxes: their stdin is the lifeline (EOF = the creator died)
_ATTACHED: dict[str, Any] = {}   # Popen or _ForkedSupervisor
_ATTACHED_LOCK = threading.Lock()
SCRIPTS_DIR = "/.microvm/scripts"


@dataclass(frozen=True)
class ImageDefaults:
    """What the image's OCI config says about running it.

    Example::

        >>> ImageDefaults(env=("PATH=/bin",), cmd=("/bin/sh",)).env_map()["PATH"]
        '/bin'
    """

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = ""
    user: str = ""

    @classmethod
    def of(cls, image: Image) -> ImageDefaults:
        """From a ``rootfs.Image``'s config.

        Example::

            ImageDefaults.of(store.get("busybox:1")).cmd
        """
        return cls(tuple(image.env), tuple(image.entrypoint), tuple(image.cmd),
                   image.working_dir, image.user)

    def env_map(self) -> dict[str, str]:
        """``env`` as a dict (entries without ``=`` are skipped).

        Example::

            >>> ImageDefaults(env=("A=1", "B")).env_map()
            {'A': '1'}
        """
        out = {}
        for e in self.env:
            k, eq, v = e.partition("=")
            if eq and k:
                out[k] = v
        return out


@dataclass
class PreparedLaunch:
    """The root and everything the supervisor needs, written to ``launch.json``."""

    launch: dict[str, Any]
    image: ImageDefaults
    prepared: PreparedRoot


def _resolve_image(cfg: SandboxConfig, image_obj: Image | None, store: ImageStore,
                   registry_auth: RegistryAuth | tuple[str, str] | None) -> Image | Path:
    if image_obj is not None:
        return image_obj
    if cfg.image_kind == "dir":
        p = Path(cfg.image).expanduser()
        if not p.is_dir():
            raise errors.SandboxConfigError(f"image directory {cfg.image!r} does not exist")
        return p.resolve()
    ca = list(cfg.registry_ca_certs) or None
    return store.pull(cfg.image, auth=registry_auth, insecure=cfg.registry_insecure,
                      ca_certs=ca, policy=cfg.pull_policy)


def prepare_launch(cfg: SandboxConfig, paths: SandboxPaths, *, image_obj: Image | None,
                   patches: Sequence[Patch], secrets: Sequence[Secret],
                   root_provider: RootProvider | None,
                   registry_auth: RegistryAuth | tuple[str, str] | None,
                   db_path: Path, boot_timeout: float) -> PreparedLaunch:
    """Pull (or take) the image, prepare the root in ``paths.root``, build the boot env.

    Raises ``rootfs`` errors (unknown image, pull failure, bad patch) unchanged.

    Example::

        pl = prepare_launch(cfg, paths, image_obj=None, patches=[], secrets=[],
                            root_provider=None, registry_auth=None, db_path=db, boot_timeout=120)
    """
    store = root_provider if isinstance(root_provider, ImageStore) else ImageStore()
    resolved = _resolve_image(cfg, image_obj, store, registry_auth)
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if isinstance(resolved, Path):
        prepared = prepare_bind_root(resolved, patches=patches)
        defaults = ImageDefaults()
    else:
        if root_provider is not None and not isinstance(root_provider, ImageStore):
            prepared = root_provider.prepare(resolved, patches=patches,
                                             upper_size_mib=cfg.upper_size_mib)
        else:
            prepared = store.prepare(resolved, patches=patches,
                                     upper_size_mib=cfg.upper_size_mib, dest=paths.root)
        defaults = ImageDefaults.of(resolved)
    env = defaults.env_map()
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(cfg.env)
    if cfg.scripts:
        env["PATH"] = f"{SCRIPTS_DIR}:{env['PATH']}"
    for s in secrets:
        env.update(s.guest_env())
    launch = {
        "config": cfg.to_json(),
        "root_plan": prepared.mount_plan(),
        "boot_env": env,
        "image": {"env": list(defaults.env), "entrypoint": list(defaults.entrypoint),
                  "cmd": list(defaults.cmd), "workdir": defaults.workdir,
                  "user": defaults.user},
        "prepared": {"record_dir": str(prepared.record_dir) if prepared.record_dir else None,
                     "upper_disk": str(prepared.upper_disk) if prepared.upper_disk else None},
        "db": str(db_path),
        "boot_timeout": boot_timeout,
    }
    return PreparedLaunch(launch, defaults, prepared)


def write_launch(paths: SandboxPaths, launch: Mapping[str, Any],
                 plugins: Mapping[str, Any]) -> None:
    """Write ``launch.json`` (0600) and, when the caller passed objects, ``plugins.pickle``.

    Example::

        write_launch(paths, pl.launch, {})
    """
    from rootfs import atomic_write

    atomic_write(paths.dir / "launch.json", json.dumps(launch).encode(), mode=0o600,
                 durable=False)   # lives and dies with the sandbox: no fsync
    present = {k: v for k, v in plugins.items() if v is not None}
    if present:
        try:
            data = pickle.dumps(present)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise errors.SandboxConfigError(
                f"backend/uplink/secret_proxy objects must be picklable (their classes "
                f"importable, as with multiprocessing's spawn): {e}") from None
        atomic_write(paths.dir / "plugins.pickle", data, mode=0o600, durable=False)


_ERRORS: dict[str, type[errors.MicrovmError]] = {
    "BootError": errors.BootError, "BackendUnavailable": errors.BackendUnavailable,
    "KernelError": errors.KernelError, "NoUplinkError": errors.NoUplinkError,
    "SandboxConfigError": errors.SandboxConfigError,
}


def _secrets_line(secrets: Iterable[Secret]) -> bytes:
    items = [{"env": s.env, "value": s.value, "hosts": [str(h) for h in s.hosts],
              "placeholder": s.placeholder, "inject": list(s.inject)} for s in secrets]
    return (json.dumps(items) if items else "").encode() + b"\n"


class _ForkedSupervisor:
    """A supervisor forked by the zygote (not our child): its stdin pipe and its pid."""

    def __init__(self, pid: int, stdin: IO[bytes]) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        """The zygote reaps it; here: wait until the pid is gone (up to ``timeout``)."""
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return 0
            except PermissionError:
                return None
            if time.monotonic() >= deadline:
                if timeout:
                    raise subprocess.TimeoutExpired(str(self.pid), timeout)
                return None
            time.sleep(0.01)


def _start_supervisor(paths: SandboxPaths) -> tuple[Any, IO[bytes], IO[bytes]]:
    """The supervisor process, its stdin (to write) and its stdout (to read): forked by
    the warm zygote when it is ready (:mod:`microvm.sandbox._zygote`), else spawned."""
    from microvm.sandbox import _zygote as zygote

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_fd = os.open(paths.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
    try:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = None
        try:
            pid = zygote.spawn([str(paths.dir)], stdin=in_r, stdout=out_w, stderr=log_fd,
                               env=env)
        finally:
            if pid is None:
                for fd in (in_r, in_w, out_r, out_w):
                    os.close(fd)
        if pid is not None:
            os.close(in_r)
            os.close(out_w)
            stdin = os.fdopen(in_w, "wb")
            return _ForkedSupervisor(pid, stdin), stdin, os.fdopen(out_r, "rb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "microvm.sandbox._supervisor", str(paths.dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_fd, close_fds=True,
            start_new_session=True, env=env)
    finally:
        os.close(log_fd)
    assert proc.stdin is not None and proc.stdout is not None
    return proc, proc.stdin, proc.stdout


def spawn_supervisor(paths: SandboxPaths, name: str, secrets: Sequence[Secret], *,
                     detached: bool, timeout: float) -> dict[str, Any]:
    """Start the supervisor, hand it the secrets, wait for its report (blocking).

    The supervisor is forked from this process's warm zygote once that runs (see
    :mod:`microvm.sandbox._zygote`; the second call without one starts it), else spawned.
    Raises the error the supervisor reported (``BootError`` with the console tail,
    ``NoUplinkError``, ...); on failure the supervisor has exited.

    Example::

        report = spawn_supervisor(paths, "web", [], detached=False, timeout=120)
    """
    paths.run.mkdir(parents=True, exist_ok=True, mode=0o700)
    proc, stdin, stdout = _start_supervisor(paths)
    try:
        stdin.write(_secrets_line(secrets))
        stdin.flush()
    except BrokenPipeError:
        pass
    if detached:
        with contextlib.suppress(OSError):
            stdin.close()
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    line = result[0] if result else b""
    stdout.close()
    if not line:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(OSError):
            stdin.close()
        tail = paths.supervisor_log.read_text(errors="replace")[-2000:] \
            if paths.supervisor_log.exists() else ""
        raise errors.SandboxError(
            f"sandbox {name!r}: the supervisor did not report within {timeout:g}s"
            + (f"; its log ends with:\n{tail}" if tail else ""))
    report: dict[str, Any] = json.loads(line)
    if not report.get("ok"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(OSError):
            stdin.close()
        cls = _ERRORS.get(str(report.get("error")), errors.SandboxError)
        msg = f"sandbox {name!r} did not start: {report.get('message')}"
        if cls is errors.BootError:
            raise errors.BootError(msg, str(report.get("console_tail") or ""))
        raise cls(msg)
    if not detached:
        with _ATTACHED_LOCK:
            _ATTACHED[name] = proc
    return report


def boot_panicked(error: BaseException) -> bool:
    """True when a start failed because the guest kernel panicked before its agent answered.

    Under QEMU TCG the emulator now and then crashes a booting guest kernel (seen about once
    in a few hundred boots on our 2-core machines: "Fatal exception in interrupt" in code
    the kernel patches at boot); nothing of the user's has run yet, so ``create`` boots
    once more. A kernel that panics every time still fails, on the second boot.

    Example::

        >>> boot_panicked(errors.BootError("guest did not boot", "Kernel panic - not syncing"))
        True
    """
    return isinstance(error, errors.BootError) and "Kernel panic" in error.console_tail


def release_attached(name: str) -> None:
    """Forget the lifeline of an attached sandbox that stopped (closes its pipe).

    Example::

        release_attached("web")
    """
    with _ATTACHED_LOCK:
        proc = _ATTACHED.pop(name, None)
    if proc is not None and proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0)


def remove_files(paths: SandboxPaths, launch: Mapping[str, Any] | None) -> None:
    """Delete a sandbox's directory, runtime directory and prepared-root record.

    Example::

        remove_files(SandboxPaths.of("web"), None)
    """
    record = (launch or {}).get("prepared", {}).get("record_dir")
    if record:
        shutil.rmtree(record, ignore_errors=True)
    shutil.rmtree(paths.run, ignore_errors=True)
    shutil.rmtree(paths.dir, ignore_errors=True)


async def wait_dead(pid: int | None, start: int | None, timeout: float) -> bool:
    """Wait until process ``pid`` (with that start time) is gone; False on timeout.

    Example::

        await wait_dead(rec.pid, rec.pid_start, 10)
    """
    from microvm.sandbox._state import process_alive

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process_alive(pid, start):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def rootfs_error_types() -> tuple[type[Exception], ...]:
    """The rootfs errors that pass through ``create`` unchanged.

    Example::

        >>> rootfs_error_types()[0].__name__
        'RootfsError'
    """
    return (RootfsError,)
