"""The reconcile engine, without a cluster and without sleeping: `looptime` runs the loop's clock.

Under `@pytest.mark.looptime` the event loop's time is fake and starts at 0: an
`asyncio.sleep(100)` returns at once with `loop.time() == 100`, every timer due before it
having fired on the way. So the backoff sequence and the timers are asserted at their exact
loop times, and "nothing happened for a while" is a fact of the loop, not a real-time bet.

Two levels: the `Engine` with fake reconcile callbacks (coalescing, backoff, timers, the
forget race), and the real `Operator.reconcile` behind it with fake actions at the engine's
boundary (create, adopt on 409, suspend and resume): the indexes are what Kopf would hand
over, the actions record what would be written.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from typing import Any

import pytest
from finetune_operator import actions, api, builders, engine, handlers, status

pytestmark = pytest.mark.looptime

Key = tuple[str, str]
KEY: Key = ("ns", "a")
JUST_NOW = status.rfc3339(datetime.datetime.now(datetime.UTC))  # a Job made now: not stalled yet


def now() -> float:
    return asyncio.get_running_loop().time()


class Recorder:
    """A reconcile callback: records (key, loop time), optionally blocks on a gate or fails."""

    def __init__(self, *, fail: Callable[[int], bool] = lambda _: False) -> None:
        self.calls: list[tuple[Key, float]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.fail = fail
        self.running = 0
        self.peak = 0

    async def __call__(self, key: Key) -> None:
        self.calls.append((key, now()))
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail(len(self.calls)):
                raise RuntimeError(f"reconcile {len(self.calls)} failed")
        finally:
            self.running -= 1

    def times(self, key: Key = KEY) -> list[float]:
        return [round(t, 3) for k, t in self.calls if k == key]


# ----- the engine -----


async def test_a_key_enqueued_while_it_runs_is_reconciled_exactly_once_more() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    eng: engine.Engine[Key] = engine.Engine(reconcile=rec)
    eng.enqueue(KEY)
    await rec.entered.wait()
    for _ in range(5):
        eng.enqueue(KEY)
    assert eng.running(KEY) and eng.queued(KEY)
    assert len(rec.calls) == 1  # one worker per key: no second reconcile alongside the first
    rec.gate.set()
    await eng.drain()
    assert len(rec.calls) == 2
    assert not eng.running(KEY) and not eng.queued(KEY)
    await asyncio.sleep(3600)  # an hour of loop time: nothing more comes
    assert len(rec.calls) == 2


async def test_keys_run_side_by_side_up_to_the_concurrency_limit() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    eng: engine.Engine[Key] = engine.Engine(reconcile=rec, concurrency=3)
    for i in range(10):
        eng.enqueue(("ns", f"j{i}"))
    for _ in range(100):  # bounded: let every worker reach the semaphore
        await asyncio.sleep(0)
    assert rec.running == 3
    rec.gate.set()
    await eng.drain()
    assert rec.peak == 3
    assert sorted(k[1] for k, _ in rec.calls) == sorted(f"j{i}" for i in range(10))


async def test_failures_back_off_1_2_5_10_30_60_then_60_and_a_success_resets() -> None:
    seen: list[tuple[Key, str, float]] = []
    rec = Recorder(fail=lambda n: n <= 8)  # the ninth reconcile succeeds
    eng: engine.Engine[Key] = engine.Engine(
        reconcile=rec, on_failure=lambda key, exc, delay: seen.append((key, str(exc), delay))
    )
    eng.enqueue(KEY)
    await asyncio.sleep(1000)
    # 0, then +1, +2, +5, +10, +30, +60, +60, +60.
    assert rec.times() == [0, 1, 3, 8, 18, 48, 108, 168, 228]
    assert [d for _, _, d in seen] == [1, 2, 5, 10, 30, 60, 60, 60]
    assert seen[0] == (KEY, "reconcile 1 failed", 1)
    assert eng.failures(KEY) == 0 and eng.due(KEY) is None
    eng.enqueue(KEY)
    await eng.drain()
    assert rec.times()[-1] == 1000  # reconciled at once: no backoff left over


async def test_backoff_counts_per_key() -> None:
    rec = Recorder(fail=lambda n: n == 1)
    eng: engine.Engine[Key] = engine.Engine(reconcile=rec)
    eng.enqueue(KEY)
    await eng.drain()
    assert eng.failures(KEY) == 1 and eng.due(KEY) == 1
    other: Key = ("ns", "b")
    eng.enqueue(other)
    await eng.drain()
    assert eng.failures(other) == 0 and eng.due(other) is None
    await asyncio.sleep(10)
    assert rec.times() == [0, 1]
    assert rec.times(other) == [0]


async def test_a_timer_fires_at_its_loop_time_and_the_earlier_one_wins() -> None:
    rec = Recorder()
    eng: engine.Engine[Key] = engine.Engine(reconcile=rec)
    eng.enqueue(KEY, delay=10)
    assert eng.due(KEY) == 10
    eng.enqueue(KEY, delay=20)  # later: the pending timer stays
    assert eng.due(KEY) == 10
    eng.enqueue(KEY, delay=4)  # earlier: replaces it
    assert eng.due(KEY) == 4
    await asyncio.sleep(3.9)
    assert rec.calls == []
    await asyncio.sleep(100)
    assert rec.times() == [4]  # once, at 4: the replaced timer never fires
    assert eng.due(KEY) is None


async def test_a_timer_firing_while_the_key_runs_coalesces_into_the_next_pass() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    eng: engine.Engine[Key] = engine.Engine(reconcile=rec)
    eng.enqueue(KEY)
    eng.enqueue(KEY, delay=5)
    await asyncio.sleep(6)  # the timer fires during the pass (the gate holds it)
    assert eng.queued(KEY) and len(rec.calls) == 1
    rec.gate.set()
    await eng.drain()
    assert rec.times() == [0, 6]


async def test_forget_while_a_reconcile_is_in_flight() -> None:
    """The stale pass finishes, is not retried, its timer goes, and the cleanup runs again after it."""
    cleanups: list[float] = []
    told: list[float] = []
    rec = Recorder(fail=lambda n: n == 1)
    rec.gate = asyncio.Event()
    eng: engine.Engine[Key] = engine.Engine(
        reconcile=rec, on_failure=lambda key, exc, delay: told.append(delay)
    )

    async def stale_pass(key: Key) -> None:
        eng.enqueue(key, delay=30)  # what a pass may schedule (a deadline, a TTL)
        await rec(key)

    eng._reconcile = stale_pass  # the same engine, a pass that also sets a timer
    eng.enqueue(KEY)
    await rec.entered.wait()
    eng.enqueue(KEY)  # an event before the deletion: dropped by the forget
    eng.forget(KEY, cleanup=lambda: cleanups.append(now()))
    assert cleanups == [0] and not eng.queued(KEY)
    await asyncio.sleep(2)
    rec.gate.set()  # the pass fails after the forget
    await eng.drain()
    assert cleanups == [0, 2]  # once at the forget, once after the stale pass
    assert eng.failures(KEY) == 0 and eng.due(KEY) is None
    assert told == []  # no "retry in ..." for a key that is gone
    await asyncio.sleep(3600)
    assert len(rec.calls) == 1  # no retry, no timer, no re-run


async def test_a_key_enqueued_after_its_forget_is_reconciled_after_the_stale_pass() -> None:
    """A FineTuneJob deleted and made again under the same name while its reconcile runs."""
    order: list[str] = []
    rec = Recorder()
    rec.gate = asyncio.Event()

    async def reconcile(key: Key) -> None:
        order.append(f"pass {len(rec.calls) + 1}")
        await rec(key)

    eng: engine.Engine[Key] = engine.Engine(reconcile=reconcile)
    eng.enqueue(KEY)
    await rec.entered.wait()
    eng.forget(KEY, cleanup=lambda: order.append("cleanup"))
    eng.enqueue(KEY)  # the new object's ADDED event
    rec.gate.set()
    await eng.drain()
    assert order == ["pass 1", "cleanup", "cleanup", "pass 2"]


async def test_forgetting_an_idle_key_cancels_its_timer() -> None:
    rec = Recorder()
    eng: engine.Engine[Key] = engine.Engine(reconcile=rec)
    eng.enqueue(KEY, delay=5)
    eng.forget(KEY)
    assert eng.due(KEY) is None
    await asyncio.sleep(60)
    assert rec.calls == []


async def test_close_cancels_workers_and_timers() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    eng: engine.Engine[Key] = engine.Engine(reconcile=rec)
    eng.enqueue(KEY)
    eng.enqueue(("ns", "later"), delay=5)
    await rec.entered.wait()
    await eng.close()
    assert not eng.busy and eng.due(("ns", "later")) is None
    await asyncio.sleep(60)
    assert len(rec.calls) == 1


def test_backoff_takes_the_last_delay_from_then_on() -> None:
    assert [engine.backoff(engine.WAIT_DELAYS, n) for n in range(7)] == [1, 2, 5, 10, 30, 30, 30]


# ----- the real reconcile behind the engine, with fake actions -----


class FakeActions:
    """Stands in for `actions.KubeActions`: answers as the API server would, records the writes."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.create_answer: Callable[
            [builders.Owner], status.JobView | actions.Refused | actions.Conflict
        ] = lambda owner: status.JobView(uid=f"job-{owner.uid}", suspend=False, created=JUST_NOW)
        self.obstacle_answer = actions.Obstacle("clear")
        self.statuses: list[dict[str, Any]] = []
        self.job_patches: list[bool] = []
        self.events: list[str] = []
        self.announced: list[str] = []

    async def create_job(self, *, owner: builders.Owner, **_: Any) -> Any:
        self.created.append(owner.name)
        return self.create_answer(owner)

    async def obstacle(self, *, owner: builders.Owner, kind: str = "Job") -> actions.Obstacle:
        return self.obstacle_answer

    def post_job_created(self, *, owner: builders.Owner, kind: str = "Job") -> None:
        self.announced.append(owner.uid)

    def post_event(self, *, event: status.Event, **_: Any) -> None:
        self.events.append(event.reason)

    async def patch_status(self, *, status: dict[str, Any], **_: Any) -> None:
        self.statuses.append(dict(status))

    async def patch_job(self, *, owner: builders.Owner, suspend: bool, kind: str = "Job") -> None:
        self.job_patches.append(suspend)

    async def creation_failure(self, **_: Any) -> str | None:
        return None

    async def delete_job(self, **_: Any) -> None:
        raise AssertionError("no Job is deleted here")


SPEC = {"data": {"train": "/d", "validationSplit": 0.2}, "output": {"path": "/m"}}


def ftj(*, uid: str = "u1", suspend: bool = False, status_: dict[str, Any] | None = None) -> handlers.FtjView:
    return handlers.ftj_view({
        "metadata": {"uid": uid, "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {**SPEC, "suspend": suspend},
        "status": status_ or {},
    })  # fmt: skip


class Bed:
    """An Operator with hand-filled indexes (what Kopf hands over) and fake actions."""

    def __init__(self) -> None:
        self.op = handlers.Operator()
        self.actions = FakeActions()
        self.op.actions = self.actions  # type: ignore[assignment]
        self.op.ftjs, self.op.jobs, self.op.pods, self.op.workloads = {}, {}, {}, {}

    def phase(self) -> Any:
        merged: dict[str, Any] = {}
        for patch in self.actions.statuses:
            merged.update(patch)
        return merged.get("phase"), merged.get("reason")

    async def settle(self) -> None:
        await self.op.engine.drain()

    async def close(self) -> None:
        await self.op.close()


@pytest.fixture
async def bed() -> Any:
    b = Bed()
    yield b
    await b.close()


def _jobs(b: Bed, key: Key, owner_uid: str, job: status.JobView) -> None:
    b.op.jobs[key] = [(owner_uid, job)]


async def test_create_makes_one_job_and_shows_pending_at_once(bed: Bed) -> None:
    key = ("create", "a")
    bed.op.ftjs[key] = [ftj()]
    bed.op.enqueue(key)
    await bed.settle()
    assert bed.actions.created == ["a"]
    assert bed.phase() == ("Pending", "Waiting")
    # Events keep coming before the Job reaches the index: the Job is never created twice.
    for _ in range(3):
        bed.op.enqueue(key)
        await bed.settle()
    assert bed.actions.created == ["a"]
    assert bed.op.engine.failures(key) == 0


async def test_adopt_on_409_goes_on_with_the_existing_job(bed: Bed) -> None:
    key = ("adopt", "a")
    bed.op.ftjs[key] = [ftj()]
    ours = status.JobView(uid="job-ours", suspend=False, active=1, created=JUST_NOW)
    bed.actions.create_answer = lambda owner: actions.Conflict()  # 409: a Job of that name exists
    bed.actions.obstacle_answer = actions.Obstacle("adopt", job=ours)  # ... and it is this FineTuneJob's
    bed.op.enqueue(key)
    await bed.settle()
    assert bed.actions.created == ["a"]  # one try, then adopted, not created again
    assert bed.op._created["u1"] == ours
    assert bed.actions.announced == ["u1"]  # JobCreated (posted again: a no-op if it exists)
    bed.op.enqueue(key)
    await bed.settle()
    assert bed.actions.created == ["a"]


async def test_a_job_in_the_index_after_a_restart_is_adopted_without_a_create(bed: Bed) -> None:
    key = ("restart", "a")
    bed.op.ftjs[key] = [ftj(status_={"observedGeneration": 1, "phase": "Pending", "reason": "Waiting"})]
    _jobs(bed, key, "u1", status.JobView(uid="job-1", suspend=False, created=JUST_NOW))
    bed.op.enqueue(key)
    await bed.settle()
    assert bed.actions.created == []
    assert bed.actions.announced == ["u1"]


async def test_a_foreign_job_of_that_name_fails_the_job(bed: Bed) -> None:
    key = ("foreign", "a")
    bed.op.ftjs[key] = [ftj()]
    bed.actions.create_answer = lambda owner: actions.Conflict()
    bed.actions.obstacle_answer = actions.Obstacle("conflict", "a batch Job named a already exists")
    bed.op.enqueue(key)
    await bed.settle()
    assert bed.phase() == ("Failed", "JobNameConflict")


async def test_suspend_and_resume_patch_the_job_each_way_once(bed: Bed) -> None:
    key = ("suspend", "a")
    job = status.JobView(uid="job-1", suspend=False, created=JUST_NOW)
    _jobs(bed, key, "u1", job)
    bed.op.ftjs[key] = [ftj(suspend=True)]
    bed.op.enqueue(key)
    await bed.settle()
    assert bed.actions.job_patches == [True]
    assert bed.phase() == ("Suspended", "Suspended")
    # The Job's watch shows it suspended: nothing more to write.
    _jobs(bed, key, "u1", status.JobView(uid="job-1", suspend=True, created=JUST_NOW))
    bed.op.enqueue(key)
    await bed.settle()
    assert bed.actions.job_patches == [True]
    # Resumed: the Job is unsuspended; the status leaves Suspended (after the status window).
    bed.op.ftjs[key] = [ftj(suspend=False)]
    bed.op.enqueue(key)
    await bed.settle()
    assert bed.actions.job_patches == [True, False]
    _jobs(bed, key, "u1", job)  # the watch shows it running again before the window closes
    bed.op.enqueue(key)
    await asyncio.sleep(bed.op.config.status_window_s + 1)
    await bed.settle()
    assert bed.actions.job_patches == [True, False]
    assert bed.phase()[0] == "Pending"


async def test_status_changes_within_the_window_are_written_once_at_its_end(bed: Bed) -> None:
    key = ("window", "a")
    bed.op.ftjs[key] = [ftj()]
    bed.op.enqueue(key)
    await bed.settle()
    written = len(bed.actions.statuses)
    assert written == 1 and bed.op._last_write["u1"] == 0  # the loop's clock, not time.monotonic()
    bed.op.ftjs[key] = [ftj(status_=bed.actions.statuses[0])]
    _jobs(bed, key, "u1", status.JobView(uid="job-u1", suspend=True, created=JUST_NOW))
    bed.op.enqueue(key)  # Queued now: held back until the window closes
    await bed.settle()
    assert len(bed.actions.statuses) == written
    assert bed.op.engine.due(key) == pytest.approx(bed.op.config.status_window_s)
    await asyncio.sleep(bed.op.config.status_window_s + 0.1)
    await bed.settle()
    assert len(bed.actions.statuses) == written + 1
    assert bed.phase() == ("Pending", "Queued")


async def test_a_failing_reconcile_is_retried_with_backoff_and_counted(bed: Bed) -> None:
    key = ("failing", "a")
    bed.op.ftjs[key] = [ftj()]
    calls: list[float] = []

    async def broken(**_: Any) -> Any:
        calls.append(now())
        raise RuntimeError("API server unavailable")

    bed.actions.create_job = broken  # type: ignore[method-assign]
    bed.op.enqueue(key)
    await asyncio.sleep(20)
    assert [round(t, 3) for t in calls] == [0, 1, 3, 8, 18]
    assert bed.op.engine.failures(key) == 5


async def test_forget_of_a_job_in_flight_leaves_nothing_of_it(bed: Bed) -> None:
    key = ("forget", "a")
    bed.op.ftjs[key] = [ftj()]
    gate = asyncio.Event()
    entered = asyncio.Event()
    original = bed.actions.create_job

    async def slow_create(**kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await original(**kwargs)

    bed.actions.create_job = slow_create  # type: ignore[method-assign]
    bed.op.enqueue(key)
    await entered.wait()
    del bed.op.ftjs[key]  # the DELETED event: gone from the index, then forgotten
    bed.op.forget(key, "u1")
    gate.set()
    await bed.settle()
    # The stale pass recorded the Job it made and its first status; the forget's second
    # round dropped them, and no timer of it is left.
    assert "u1" not in bed.op._created and "u1" not in bed.op._written and "u1" not in bed.op._last_write
    assert bed.op.engine.due(key) is None


def test_the_engine_imports_neither_kopf_nor_kubernetes() -> None:
    import ast
    from pathlib import Path

    tree = ast.parse(Path(engine.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported <= {"__future__", "asyncio", "collections", "typing"}, imported
    assert api.API_GROUP  # the operator's modules import fine beside it
