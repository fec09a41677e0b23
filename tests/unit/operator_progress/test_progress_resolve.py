"""Two replicas: a hub that does not know a job looks it up through the injected `resolve`.

The fake resolver stands in for the operator's read of the FineTuneJob (the seam the operator
injects); it counts its calls so the caching and the cap are checked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from finetune_operator import metrics
from finetune_operator.progress import Registration
from progress_helpers import MakeLive, report


@dataclass
class FakeResolver:
    """Jobs by (namespace, name); optionally blocks every lookup until `release` is set."""

    jobs: dict[tuple[str, str], Registration] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    release: asyncio.Event | None = None
    in_flight: int = 0
    peak: int = 0
    fail: bool = False

    async def __call__(self, *, namespace: str, name: str) -> Registration | None:
        self.calls.append((namespace, name))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.release is not None:
                await self.release.wait()
            if self.fail:
                raise RuntimeError("apiserver unreachable")
            return self.jobs.get((namespace, name))
        finally:
            self.in_flight -= 1


def _epoch_series(name: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(
        "finetune_job_epoch", {"namespace": "ml", "name": name, "stage": "head"}
    )


async def test_a_job_another_replica_reconciles_is_resolved_once_and_written(make_live: MakeLive) -> None:
    resolver = FakeResolver(jobs={("ml", "r1"): Registration(uid="u1", total_epochs=10)})
    live = await make_live(min_write_interval_s=0.0, resolve=resolver)
    live.tokens.add(namespace="ml", name="r1", uid="u1", token="tok-r1")
    assert (await live.post(report(name="r1", uid="u1", epoch=1), token="tok-r1")).status == 202
    assert (await live.post(report(name="r1", uid="u1", epoch=2), token="tok-r1")).status == 202
    written = await live.recorder.wait_latest(lambda s: s["epoch"] == 2, namespace="ml", name="r1")
    assert written["progress"] == 20 and written["totalEpochs"] == 10
    assert resolver.calls == [("ml", "r1")]
    assert live.hub.is_registered(namespace="ml", name="r1")
    # The replica that reconciles the job owns its per-job series: none here.
    assert _epoch_series("r1") is None
    # A wrong token for the resolved job is still refused, without another lookup.
    assert (await live.post(report(name="r1", uid="u1", epoch=3), token="forged")).status == 401
    assert resolver.calls == [("ml", "r1")]
    # The operator registers it (this replica became the active one): series appear.
    live.register(namespace="ml", name="r1", uid="u1", token="tok-r1", total_epochs=10)
    assert (await live.post(report(name="r1", uid="u1", epoch=4), token="tok-r1")).status == 202
    assert _epoch_series("r1") == 4


async def test_unknown_and_finished_jobs_are_looked_up_at_most_once_per_ttl(make_live: MakeLive) -> None:
    resolver = FakeResolver()  # knows nothing: gone, or finished (the operator's resolver says None)
    live = await make_live(min_write_interval_s=0.0, resolve=resolver, resolve_ttl_s=60.0)
    for _ in range(5):
        assert (await live.post(report(name="ghost"), token="whatever")).status == 404
    assert resolver.calls == [("ml", "ghost")]
    assert live.recorder.for_job("ml", "ghost") == []
    assert not live.hub.is_registered(namespace="ml", name="ghost")


async def test_a_token_of_another_known_job_is_forbidden_for_a_resolved_one(make_live: MakeLive) -> None:
    resolver = FakeResolver(jobs={("ml", "b"): Registration(uid="ub", total_epochs=10)})
    live = await make_live(min_write_interval_s=0.0, resolve=resolver)
    live.tokens.add(namespace="ml", name="b", uid="ub", token="tok-b")
    live.register(namespace="ml", name="a", uid="ua", token="tok-a", total_epochs=10)
    assert (await live.post(report(name="b"), token="tok-a")).status == 403
    assert resolver.calls == [("ml", "b")]
    assert live.recorder.for_job("ml", "b") == []


async def test_a_flood_of_made_up_names_is_capped(make_live: MakeLive) -> None:
    resolver = FakeResolver(release=asyncio.Event())
    live = await make_live(min_write_interval_s=0.0, resolve=resolver, max_resolves=3)
    posts = [asyncio.create_task(live.post(report(name=f"bogus-{i}"), token="x")) for i in range(20)]
    # The lookups beyond the cap are refused at once, while three are still blocked.
    done, _ = await asyncio.wait(posts, timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
    assert done
    for _ in range(500):
        if sum(p.done() for p in posts) >= 17:
            break
        await asyncio.sleep(0.01)
    assert sum(p.done() for p in posts) == 17
    assert resolver.peak == 3 and len(resolver.calls) == 3
    resolver.release.set()  # type: ignore[union-attr]
    statuses = [(await p).status for p in posts]
    assert statuses == [404] * 20
    assert len(resolver.calls) == 3


async def test_a_failing_lookup_is_an_unknown_job_and_counted(make_live: MakeLive) -> None:
    resolver = FakeResolver(fail=True)
    live = await make_live(min_write_interval_s=0.0, resolve=resolver)
    before = metrics.REGISTRY.get_sample_value("finetune_reconcile_errors_total", {"handler": "progress"}) or 0.0
    assert (await live.post(report(name="flaky"), token="x")).status == 404
    after = metrics.REGISTRY.get_sample_value("finetune_reconcile_errors_total", {"handler": "progress"})
    assert after == before + 1


async def test_a_new_incarnation_is_looked_up_again(make_live: MakeLive) -> None:
    resolver = FakeResolver(jobs={("ml", "n"): Registration(uid="old", total_epochs=10)})
    live = await make_live(min_write_interval_s=0.0, resolve=resolver, resolve_ttl_s=0.0)
    live.tokens.add(namespace="ml", name="n", uid="old", token="tok-old")
    assert (await live.post(report(name="n", uid="old"), token="tok-old")).status == 202
    # Deleted and made again under the same name: the new pod's report names the new uid.
    resolver.jobs[("ml", "n")] = Registration(uid="new", total_epochs=4)
    live.tokens.add(namespace="ml", name="n", uid="new", token="tok-new")
    new = report(name="n", uid="new", epoch=1, stage_epochs=2, total_epochs=4)
    assert (await live.post(new, token="tok-new")).status == 202
    written = await live.recorder.wait_latest(lambda s: s["totalEpochs"] == 4, namespace="ml", name="n")
    assert written["progress"] == 25
    assert (await live.post(report(name="n", uid="old", epoch=2), token="tok-old")).status in (401, 403)
