"""One asyncio event loop in a daemon thread, for callers that are not asyncio.

The gateway's asyncio parts (the DNS forwarder, the published ports) serve threads that
are not event loops: the C frame loop's slow path, the synchronous :class:`Gateway`
API. :class:`LoopThread` is the one sync-over-async shape netstack uses for them, and it
mirrors the project's pattern (the loop-thread "portal" of ``microvm``; netstack cannot
import microvm, so it keeps this small twin of the same shape): :meth:`~LoopThread.start`
the thread, :meth:`~LoopThread.submit` a coroutine from any thread and get a
``concurrent.futures.Future``, :meth:`~LoopThread.call` to wait for it, and
:meth:`~LoopThread.close` (also as a context manager) to cancel what is still running
and join the thread.

>>> import asyncio
>>> async def add(a: int, b: int) -> int:
...     await asyncio.sleep(0)
...     return a + b
>>> with LoopThread("doc") as t:
...     t.call(add(1, 2))
3
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from netstack.errors import GatewayError

T = TypeVar("T")

#: seconds :meth:`LoopThread.call` and :meth:`LoopThread.close` wait by default
DEFAULT_TIMEOUT = 10.0


class LoopThread:
    """An event loop running in a daemon thread named ``netstack-<name>``.

    ``on_close``: a coroutine function run on the loop first thing in :meth:`close`
    (stop listeners, say); then every other task is cancelled and awaited, so nothing
    is left pending when the loop stops.

    >>> t = LoopThread("doc-a").start()
    >>> t.submit(asyncio.sleep(0, "done")).result(5)
    'done'
    >>> t.close(); t.closed
    True
    """

    def __init__(self, name: str,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise GatewayError(f"loop thread name must be a non-empty string, got {name!r}")
        self.loop = asyncio.new_event_loop()
        self._on_close = on_close
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name=f"netstack-{name}")

    def start(self) -> LoopThread:
        """Start the thread (idempotent); returns ``self``.

        >>> LoopThread("doc-b").start().start().close()
        """
        if self.loop.is_closed():
            raise GatewayError("the loop thread is closed")
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()
        return self

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has stopped the loop.

        >>> LoopThread("doc-c").closed
        False
        """
        return self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop from any thread.

        >>> with LoopThread("doc-d") as t:
        ...     t.submit(asyncio.sleep(0, 7)).result(5)
        7
        """
        if self.loop.is_closed():
            coro.close()
            raise GatewayError("the loop thread is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = DEFAULT_TIMEOUT) -> T:
        """:meth:`submit` and wait up to ``timeout`` seconds for the result.

        >>> with LoopThread("doc-e") as t:
        ...     t.call(asyncio.sleep(0, "ok"))
        'ok'
        """
        return self.submit(coro).result(timeout)

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Run ``on_close``, cancel and await every other task, stop the loop and join
        the thread (idempotent).

        >>> t = LoopThread("doc-f").start(); t.close(); t.close(); t.closed
        True
        """
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    async def _shutdown(self) -> None:
        """``on_close``, then cancel and await every other task on the loop (work in
        flight, connections, upstream waits), so that nothing is left pending when the
        loop stops ("Task was destroyed but it is pending!") and no transport closes
        itself on a closed loop ("Event loop is closed")."""
        if self._on_close is not None:
            await self._on_close()
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

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
