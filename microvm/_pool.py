"""``microvm.Pool``: N sandboxes restored from one snapshot, kept ready to hand out.

A pool starts from a stored snapshot (a name or a directory), or from an image: then it
creates one sandbox with the given settings, snapshots it into a private template and
removes it. A background thread keeps ``size`` restores ready; :meth:`Pool.acquire`
hands one out at once (or waits for the next) and the thread refills; :meth:`Pool.release`
removes a sandbox handed out; :meth:`Pool.close` removes every sandbox of the pool
(ready or handed out) and its private template.

Example::

    from microvm import Pool
    with Pool("warm", size=4) as pool:          # "warm": a snapshot (Sandbox.snapshot)
        sb = pool.acquire()
        print(sb.shell("echo hi").stdout_text)
        pool.release(sb)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from microvm.errors import SandboxConfigError, SandboxError, SnapshotError

if TYPE_CHECKING:
    from microvm.sandbox import Sandbox
    from rootfs import Image
    from tls_proxy import Secret

__all__ = ["Pool"]


class Pool:
    """Keeps ``size`` sandboxes restored from one snapshot ready (see the module docstring).

    ``source``: a snapshot name or directory, else an image (reference, ``rootfs.Image``
    or directory) created once with ``cpus``, ``memory``, ``env``, ``network``, ``hostname``,
    ``labels`` and then snapshotted. ``secrets`` go to every sandbox (values are never
    stored). Sandboxes are named ``<name>-<k>``.

    Example (from a local one-layer image; ``with`` closes the pool, removing its
    sandboxes and template)::

        >>> import shutil
        >>> from pathlib import Path
        >>> from microvm import Pool
        >>> from rootfs import ImageStore, build_image
        >>> (Path("bb") / "bin").mkdir(parents=True)
        >>> _ = shutil.copy("/bin/busybox", "bb/bin/busybox")
        >>> (Path("bb") / "bin/sh").symlink_to("busybox")
        >>> image = build_image(Path("bb"), "local/busybox:1", ImageStore(),
        ...                     config={"Cmd": ["/bin/sh"]})
        >>> with Pool(image, size=1, name="docpool", network="none", memory=256) as pool:
        ...     sb = pool.acquire()
        ...     print(sb.shell("echo hi from $(hostname)").stdout_text.strip())
        ...     pool.release(sb)
        hi from docpool-1

    A pool can also start from a stored snapshot by name or directory::

        pool = Pool("warm", size=2)      # "warm": a Sandbox.snapshot
        sb = pool.acquire(); pool.release(sb); pool.close()
    """

    def __init__(
        self,
        source: str | Image | os.PathLike[str],
        *,
        size: int,
        name: str = "pool",
        cpus: int = 1,
        memory: int = 512,
        env: Mapping[str, str] | None = None,
        network: object = None,
        hostname: str | None = None,
        labels: Mapping[str, str] | None = None,
        secrets: Sequence[Secret | Mapping[str, Any]] | None = None,
        boot_timeout: float = 120.0,
    ) -> None:
        from microvm.sandbox._config import validate_name
        from microvm.sandbox._snapshots import SnapshotInfo, resolve, snapshots_root

        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 64:
            raise SandboxConfigError(f"bad pool size {size!r}: an integer from 1 to 64")
        validate_name(name)
        self.name = name
        self.size = size
        self._secrets = list(secrets or [])
        self._boot_timeout = boot_timeout
        self._labels = {**(labels or {}), "microvm.pool": name}
        self._ready: list[Sandbox] = []
        self._out: dict[str, Sandbox] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._seq = 0
        self._own_template = False
        snap: Path | None = None
        if isinstance(source, str | os.PathLike) and not _looks_like_image(source):
            with contextlib.suppress(SnapshotError, SandboxConfigError):
                candidate = resolve(source)
                if (candidate / "manifest.json").exists():
                    snap = candidate
        if snap is not None:
            SnapshotInfo.of(snap)          # refuses a corrupted/mismatched one now
        else:
            from microvm.sandbox import Sandbox

            base = f"{name}-template"
            template = snapshots_root() / f".pool-{name}-{time.time_ns()}"
            sb = Sandbox.create(base, image=source, cpus=cpus, memory=memory, env=env,
                                network=network, hostname=hostname, labels=self._labels,
                                secrets=secrets, boot_timeout=boot_timeout, replace=True)
            try:
                from microvm.sandbox import _snapshots as _snap

                template.parent.mkdir(parents=True, exist_ok=True)
                sb._loop.run(_snap.take(sb._sb, template, checksums=False))
                snap = template
                self._own_template = True
            finally:
                sb.stop()
                Sandbox.remove(base)
        self.snapshot = snap
        from microvm.sandbox import _zygote as zygote

        zygote.prestart()   # the refills' supervisors fork from a warm zygote
        self._thread = threading.Thread(target=self._refill, name=f"microvm-pool-{name}",
                                        daemon=True)
        self._thread.start()

    # -- background refill ---------------------------------------------------------------
    def _refill(self) -> None:
        from microvm.sandbox import Sandbox

        while True:
            with self._cond:
                while not self._closed and len(self._ready) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
                self._seq += 1
                nm = f"{self.name}-{self._seq}"
            try:
                sb = Sandbox.restore(self.snapshot, name=nm, secrets=self._secrets,
                                     labels=self._labels, boot_timeout=self._boot_timeout)
                # ready means ready: the agent connection (relay hello) is made here, and
                # one exec warms the guest's exec path (a restored TCG guest starts with an
                # empty translation cache: the first exec costs ~5x a later one), so that
                # acquire() + the caller's first exec is one relay round trip
                _warm(sb)
            except BaseException as e:  # surfaced by acquire()
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                if self._closed:
                    _remove(sb)
                    return
                self._ready.append(sb)
                self._cond.notify_all()

    @property
    def ready(self) -> int:
        """How many sandboxes wait to be handed out.

        Example::

            pool.ready
        """
        with self._cond:
            return len(self._ready)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until ``size`` sandboxes are ready; raises :class:`SandboxError` on
        timeout or when a restore failed.

        Example::

            pool.wait_ready()
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < self.size:
                self._raise_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SandboxError(f"pool {self.name!r}: {len(self._ready)} of {self.size} "
                                       f"ready after {timeout:g}s")
                self._cond.wait(left)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise SandboxError(f"pool {self.name!r}: refilling failed: {self._error}") \
                from self._error
        if self._closed:
            raise SandboxError(f"pool {self.name!r} is closed")

    def acquire(self, timeout: float = 120.0) -> Sandbox:
        """Hand out a ready sandbox (waiting up to ``timeout`` for one); the pool refills.

        Example::

            sb = pool.acquire()
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                self._raise_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SandboxError(f"pool {self.name!r}: no sandbox ready within "
                                       f"{timeout:g}s")
                self._cond.wait(left)
            sb = self._ready.pop(0)
            self._out[sb.name] = sb
            self._cond.notify_all()
        return sb

    def release(self, sb: Sandbox) -> None:
        """Remove a sandbox this pool handed out (the pool refills on its own).

        Example::

            pool.release(sb)
        """
        with self._cond:
            if self._out.pop(sb.name, None) is None:
                raise SandboxConfigError(f"sandbox {sb.name!r} was not handed out by pool "
                                         f"{self.name!r}")
        _remove(sb)

    def close(self) -> None:
        """Stop refilling; remove every sandbox of the pool and its private template.

        Example::

            pool.close()
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=300)
        with self._cond:
            left = self._ready + list(self._out.values())
            self._ready, self._out = [], {}
        for sb in left:
            _remove(sb)
        if self._own_template:
            shutil.rmtree(self.snapshot, ignore_errors=True)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _looks_like_image(source: object) -> bool:
    return isinstance(source, str) and (":" in source or "/" in source) and not \
        source.startswith(("/", "."))


def _warm(sb: Sandbox) -> None:
    # exec connects to the agent first: an image without /bin/true is connected and
    # warm enough
    with contextlib.suppress(Exception):
        sb.exec("/bin/true", timeout=30)


def _remove(sb: Sandbox) -> None:
    from microvm.sandbox import Sandbox

    with contextlib.suppress(SandboxError):
        sb.stop(timeout=5)
    with contextlib.suppress(SandboxError):
        Sandbox.remove(sb.name, timeout=5)
    with contextlib.suppress(Exception):
        sb.close()
