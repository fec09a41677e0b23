"""The reconcile engine: a keyed work queue, one worker per key, coalescing, retries and timers.

The operator turns every watch event into a key (a FineTuneJob's namespace and name) and
`enqueue`s it; the engine calls the reconcile callback for it, level-based:

- One worker per key, at most `concurrency` reconciles at once over all keys. A key enqueued
  while its reconcile runs is reconciled exactly once more afterwards, however many times it
  was enqueued meanwhile (coalescing).
- A reconcile that raises is retried after `retry_delays` (1, 2, 5, 10, 30, 60 s, then 60 s
  on), counted per key; a success resets the count.
- `enqueue(key, delay=...)` sets the key's timer: the earlier of the pending and the new due
  time wins, so a later request never postpones an earlier one.
- `forget(key)` drops the key's timer, retry count and pending re-run. When a reconcile of
  the key is in flight, it finishes (it is not cancelled halfway through its API calls), is
  not retried if it fails, any timer it set is dropped, and the cleanup passed to `forget`
  runs once more after it, so that what the stale pass recorded goes too. A key enqueued
  after the forget (a FineTuneJob made again under the same name) is reconciled after that.

No Kopf and no Kubernetes here: the reconcile is a callback and time comes from an injected
`Clock`, the running event loop's by default (so that `looptime` drives it in tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["WAIT_DELAYS", "Clock", "Engine", "backoff"]

RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # after a failed reconcile
WAIT_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # looking again at what an earlier FineTuneJob left

K = TypeVar("K", bound=Hashable)


class Timer(Protocol):
    """A scheduled callback (asyncio.TimerHandle is one)."""

    def cancel(self) -> None: ...

    def when(self) -> float: ...


class Clock(Protocol):
    """Monotonic seconds and callbacks at a time on that scale."""

    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """The running event loop's clock (`loop.time()`, `loop.call_at`)."""

    def time(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_at(when, callback)


def backoff(delays: Sequence[float], attempt: int) -> float:
    """The delay before look `attempt` (0-based): `delays[attempt]`, the last one from then on."""
    return delays[min(max(attempt, 0), len(delays) - 1)]


class Engine(Generic[K]):
    """Runs `reconcile(key)` for enqueued keys; see the module docstring."""

    def __init__(
        self,
        *,
        reconcile: Callable[[K], Awaitable[None]],
        clock: Clock | None = None,
        concurrency: int = 64,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        on_failure: Callable[[K, Exception, float], None] | None = None,
    ) -> None:
        """`on_failure(key, error, retry_in_s)` is told of each failed reconcile (logging, metrics)."""
        self.clock: Clock = clock if clock is not None else LoopClock()
        self._reconcile = reconcile
        self._retry_delays = tuple(retry_delays)
        self._on_failure = on_failure
        self._limit = asyncio.Semaphore(concurrency)
        self._running: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, Timer] = {}
        self._forgotten: dict[K, list[Callable[[], None]]] = {}  # forgotten while a reconcile ran
        self._tasks: set[asyncio.Task[None]] = set()

    # ----- what the operator calls -----

    def enqueue(self, key: K, *, delay: float = 0.0) -> None:
        """Reconcile `key` now (once more, if it runs), or after `delay` seconds at the latest."""
        if delay > 0:
            due = self.clock.time() + delay
            old = self._timers.get(key)
            if old is not None and old.when() <= due:
                return
            if old is not None:
                old.cancel()
            self._timers[key] = self.clock.call_at(due, lambda: self._fire(key))
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        task = asyncio.get_running_loop().create_task(self._worker(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, key: K, *, cleanup: Callable[[], None] | None = None) -> None:
        """The key's object is gone: drop its timer, retries and re-run; run `cleanup` now
        and, when a reconcile of it is in flight, once more after that reconcile."""
        self._dirty.discard(key)
        self._failures.pop(key, None)
        self._cancel_timer(key)
        if key in self._running:
            self._forgotten.setdefault(key, []).extend([cleanup] if cleanup is not None else [])
        if cleanup is not None:
            cleanup()

    # ----- what tests and shutdown look at -----

    def due(self, key: K) -> float | None:
        """The clock time at which the key's timer fires; None: no timer."""
        timer = self._timers.get(key)
        return None if timer is None else timer.when()

    def failures(self, key: K) -> int:
        """Failed reconciles of the key in a row."""
        return self._failures.get(key, 0)

    def running(self, key: K) -> bool:
        """Whether a worker of the key is running."""
        return key in self._running

    def queued(self, key: K) -> bool:
        """Whether the key is due to be reconciled once more after the running pass."""
        return key in self._dirty

    @property
    def busy(self) -> bool:
        """Whether any worker runs."""
        return bool(self._tasks)

    async def drain(self) -> None:
        """Until no worker runs (timers may still be pending)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        """Cancel every timer and worker."""
        for key in list(self._timers):
            self._cancel_timer(key)
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # ----- internals -----

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.enqueue(key)

    def _cancel_timer(self, key: K) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def _worker(self, key: K) -> None:
        try:
            while True:
                self._dirty.discard(key)
                try:
                    async with self._limit:
                        await self._reconcile(key)
                except Exception as exc:
                    if key not in self._forgotten:
                        count = self._failures.get(key, 0)
                        self._failures[key] = count + 1
                        delay = backoff(self._retry_delays, count)
                        if self._on_failure is not None:
                            self._on_failure(key, exc, delay)
                        self.enqueue(key, delay=delay)
                else:
                    self._failures.pop(key, None)
                cleanups = self._forgotten.pop(key, None)
                if cleanups is not None:
                    # The pass began before the key was forgotten: what it scheduled goes, and
                    # what it recorded is cleaned up again.
                    self._cancel_timer(key)
                    self._failures.pop(key, None)
                    for cleanup in cleanups:
                        cleanup()
                if key not in self._dirty:
                    break
        finally:
            self._running.discard(key)
            self._forgotten.pop(key, None)
