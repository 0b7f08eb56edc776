"""netstack's blocking-over-asyncio seam: a :class:`Portal` (a loop in a daemon thread).

The gateway's asyncio parts (the DNS forwarder, the published ports) serve callers
that are not event loops: the C frame loop's slow path, the synchronous
:class:`~netstack.gateway.Gateway` API. The project has one pattern for that, the
loop-thread portal of ``microvm/_portal.py`` (modelled on anyio's ``BlockingPortal``);
netstack may not import microvm, so this is its small twin with the same shape and
rules: the thread starts at construction, :meth:`Portal.run` blocks on one coroutine
(an interrupt or timeout cancels it and waits for its cleanup), :meth:`Portal.submit`
returns a ``concurrent.futures.Future``, :meth:`Portal.close` cancels what still runs,
stops the loop and joins the thread (idempotent; also as a context manager). The
difference: netstack's errors are :class:`~netstack.errors.GatewayError`.

>>> import asyncio
>>> async def add(a: int, b: int) -> int:
...     await asyncio.sleep(0)
...     return a + b
>>> with Portal("doc") as portal:
...     portal.run(add(1, 2))
3
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from netstack.errors import GatewayError

__all__ = ["Portal", "run_once"]

T = TypeVar("T")

#: seconds the main thread waits at a time (how late a signal can be noticed at worst)
_SIGNAL_SLICE = 0.25


class Portal:
    """A private asyncio loop in a daemon thread; :meth:`run` blocks on one coroutine.

    ``name`` names the thread (``netstack-<name>``). ``cancel_grace`` bounds how long an
    interrupted :meth:`run` waits for the cancelled coroutine's cleanup.

    Example::

        >>> import asyncio
        >>> portal = Portal("doc")
        >>> portal.run(asyncio.sleep(0, result="done"))
        'done'
        >>> portal.close(); portal.closed
        True
    """

    def __init__(self, name: str = "portal", *, cancel_grace: float = 30.0) -> None:
        if not isinstance(name, str) or not name:
            raise GatewayError(f"portal name must be a non-empty str, got {name!r}")
        if not isinstance(cancel_grace, int | float) or cancel_grace < 0:
            raise GatewayError(f"cancel_grace must be >= 0 seconds, got {cancel_grace!r}")
        self.cancel_grace = float(cancel_grace)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"netstack-{name}",
                                       daemon=True)
        running = threading.Event()
        self.loop.call_soon(running.set)   # the loop's first callback: it runs from now on
        self.thread.start()
        running.wait()   # close() right after creation then stops a running loop

    @property
    def closed(self) -> bool:
        """True once :meth:`close` stopped the loop.

        Example::

            >>> p = Portal("doc"); p.closed
            False
            >>> p.close(); p.closed
            True
        """
        return self.loop.is_closed()

    def run(self, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Run ``aw`` on the portal's loop and block until it finishes; its result or exception.

        ``timeout`` (seconds, None: no limit) raises :class:`TimeoutError` once passed, after
        cancelling ``aw`` like an interrupt does. Raises :class:`RuntimeError` when called
        from the portal's own thread or after :meth:`close`.

        Example::

            >>> import asyncio
            >>> with Portal("doc") as p:
            ...     p.run(asyncio.sleep(0, result=42))
            42
        """
        refused = ("Portal.run called from the portal's own loop thread: await instead"
                   if threading.current_thread() is self.thread else
                   "Portal.run after close(): the handle is closed" if self.loop.is_closed()
                   else None)
        if refused is not None:
            if asyncio.iscoroutine(aw):
                aw.close()   # not "never awaited"
            raise RuntimeError(refused)
        tasks: list[asyncio.Task[Any]] = []   # the runner's task, for an interrupted wait

        async def runner() -> T:
            task = asyncio.current_task()
            if task is not None:
                tasks.append(task)
            return await aw

        fut: Future[T] | None = None
        try:
            fut = asyncio.run_coroutine_threadsafe(runner(), self.loop)
            return _wait(fut, timeout)
        except BaseException:
            if fut is not None and not fut.done():
                # interrupted while waiting (KeyboardInterrupt, timeout): cancel the coroutine, let
                # its except/finally blocks run (kill a half-booted VMM, close a socket)
                fut.cancel()
                self._settle(tasks)
            raise

    def _settle(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Wait (at most ``cancel_grace`` seconds) for a cancelled :meth:`run` to finish its
        cleanup. Runs on the loop after the cancellation (callbacks run in order), so the
        runner's task, started before, is in ``tasks``."""
        async def settle() -> None:
            if tasks:
                await asyncio.wait(tasks, timeout=self.cancel_grace)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(settle(), self.loop).result(self.cancel_grace + 5)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Start ``coro`` on the loop without waiting; its ``concurrent.futures.Future``.

        Example::

            >>> import asyncio
            >>> with Portal("doc") as p:
            ...     p.submit(asyncio.sleep(0, result=7)).result(5)
            7
        """
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("Portal.submit after close(): the handle is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run_in_loop(self, fn: Callable[[], T]) -> T:
        """Run a plain callable on the loop thread (for loop-bound, non-async calls such as a
        transport's ``pause_reading``) and return its result.

        Example::

            >>> with Portal("doc") as p:
            ...     p.run_in_loop(lambda: 6 * 7)
            42
        """
        async def wrap() -> T:
            return fn()

        return self.run(wrap())

    def close(self, timeout: float = 10.0) -> None:
        """Cancel and await what still runs on the loop, stop it and join its thread
        (idempotent; at most about ``timeout`` seconds).

        Example::

            >>> p = Portal("doc"); p.close(); p.close()
        """
        if self.loop.is_closed():
            return
        if self.loop.is_running():
            if threading.current_thread() is self.thread:
                self.loop.stop()   # from a callback on the loop itself: no waiting here
                return
            try:
                with contextlib.suppress(Exception):   # a task that would not end: stop anyway
                    asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(timeout)
        if not self.loop.is_running():
            self.loop.close()

    async def _shutdown(self) -> None:
        """Cancel and await every other task (nothing left pending when the loop stops:
        no "Task was destroyed but it is pending!"), then close async generators."""
        me = asyncio.current_task()
        for _ in range(3):   # a cancelled task may start a cleanup task of its own
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            if not tasks:
                break
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=5)
        await asyncio.sleep(0)   # let transports run their connection_lost callbacks
        await self.loop.shutdown_asyncgens()

    def __enter__(self) -> Portal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Portal({self.thread.name!r}, closed={self.closed})"


def _wait(fut: Future[T], timeout: float | None) -> T:
    """``fut.result(timeout)``, in slices on the main thread: a signal that lands just before
    the thread blocks on the lock is otherwise only noticed when the wait ends (CPython
    checks pending signals on wake-up), so Ctrl-C would go unheard for the whole call."""
    step = _SIGNAL_SLICE if threading.current_thread() is threading.main_thread() else None
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = step
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            wait = left if wait is None else min(wait, left)
        try:
            return fut.result(wait)
        except TimeoutError:
            if fut.done():   # the coroutine's own TimeoutError, or it ended just now
                return fut.result()
            if deadline is not None and time.monotonic() >= deadline:
                raise


def run_once(coro: Coroutine[Any, Any, T], name: str = "portal") -> T:
    """Run one coroutine on a throwaway portal (a class-level call with no handle yet).

    Example::

        >>> import asyncio
        >>> run_once(asyncio.sleep(0, result="ok"))
        'ok'
    """
    portal = Portal(name)
    try:
        return portal.run(coro)
    finally:
        portal.close()
