"""The progress endpoint: authentication, limits, dropping, coalescing, and status untouched by refusals."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from finetune_operator import metrics
from progress_helpers import Live, MakeLive, holds_write, quiet, report


def reports_total(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("finetune_progress_reports_total", {"result": result}) or 0.0


async def barrier(live: Live, *, namespace: str = "ml", name: str = "barrier") -> None:
    """Send a valid report for another job, wait for its write, then until the hub has no write
    in flight: anything the refused reports could have triggered was spawned before it."""
    live.register(namespace=namespace, name=name, uid="", token="barrier-token", total_epochs=10)
    before = len(live.recorder.for_job(namespace, name))
    resp = await live.post(report(namespace=namespace, name=name), token="barrier-token")
    assert resp.status == 202
    await live.recorder.wait_for(before + 1, namespace=namespace, name=name)
    await quiet(live.hub)


async def test_auth_missing_wrong_cross_job_and_valid(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0)
    live.register(namespace="ml", name="a", uid="u-a", token="token-a", total_epochs=10)
    live.register(namespace="ml", name="b", uid="u-b", token="token-b", total_epochs=10)
    before = {r: reports_total(r) for r in ("unauthorized", "forbidden", "accepted")}

    missing = await live.post(report(name="a"), token=None)
    assert missing.status == 401
    assert missing.headers.get("WWW-Authenticate") == "Bearer"
    basic = await live.post(report(name="a"), token=None, headers={"Authorization": "Basic dG9rZW4tYQ=="})
    assert basic.status == 401
    wrong = await live.post(report(name="a"), token="token-x")
    assert wrong.status == 401
    cross = await live.post(report(name="b"), token="token-a")
    assert cross.status == 403
    cross_unknown = await live.post(report(name="nope"), token="token-a")
    assert cross_unknown.status == 404  # an unknown job is never authenticated against
    wrong_uid = await live.post(report(name="a", uid="someone-else"), token="token-a")
    assert wrong_uid.status == 403

    await barrier(live)
    assert live.recorder.for_job("ml", "a") == []
    assert live.recorder.for_job("ml", "b") == []
    assert reports_total("unauthorized") - before["unauthorized"] == 3
    assert reports_total("forbidden") - before["forbidden"] == 2

    ok = await live.post(report(name="a", uid="u-a", epoch=3), token="token-a")
    assert ok.status == 202
    (status,) = await live.recorder.wait_for(1, namespace="ml", name="a")
    assert status["epoch"] == 3
    assert live.recorder.for_job("ml", "b") == []


async def test_oversized_by_header_and_by_streamed_body(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0, max_body_bytes=65536)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)
    before = reports_total("too_large")
    big = json.dumps(report(name="a")).encode() + b" " * 65536

    by_header = await live.post(None, token="token-a", raw=big)
    assert by_header.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    headers = {"Authorization": "Bearer token-a", "Content-Type": "application/json"}
    async with live.session.post(live.url, data=chunks(), headers=headers) as resp:
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert resp.status == 413

    await barrier(live)
    assert live.recorder.for_job("ml", "a") == []
    assert reports_total("too_large") - before == 2

    # Just under the limit is fine (padding whitespace is valid JSON).
    fits = json.dumps(report(name="a")).encode()
    fits += b" " * (65536 - len(fits))
    assert (await live.post(None, token="token-a", raw=fits)).status == 202


async def test_malformed_json_and_schema_are_400_with_the_error(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)
    before = reports_total("invalid")

    async with live.session.post(
        live.url, data=b"{not json", headers={"Authorization": "Bearer token-a"}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid progress report"

    bad = report(name="a")
    bad["epoch"] = -1
    bad["admin"] = True
    async with live.session.post(live.url, json=bad, headers={"Authorization": "Bearer token-a"}) as resp:
        assert resp.status == 400
        locs = {tuple(e["loc"]) for e in (await resp.json())["detail"]}
    assert ("epoch",) in locs
    assert ("admin",) in locs

    missing = report(name="a")
    del missing["stage"]
    assert (await live.post(missing, token="token-a")).status == 400
    wrong_stage = report(name="a")
    wrong_stage["stage"] = "phase-3"
    assert (await live.post(wrong_stage, token="token-a")).status == 400

    await barrier(live)
    assert live.recorder.for_job("ml", "a") == []
    assert reports_total("invalid") - before == 4


async def test_flooding_gets_429_with_retry_after(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=60.0, rate_per_s=0.05, burst=3)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)
    before = reports_total("rate_limited")
    statuses = []
    for i in range(8):
        # The burst carries epochs 1-3; every refused report carries epoch 9.
        resp = await live.post(report(name="a", epoch=i + 1 if i < 3 else 9), token="token-a")
        statuses.append(resp.status)
        if resp.status == 429:
            assert int(resp.headers["Retry-After"]) >= 1
    assert statuses[:3] == [202, 202, 202]
    assert statuses[3:] == [429] * 5
    assert reports_total("rate_limited") - before == 5
    # The flood of one job does not limit another.
    live.register(namespace="ml", name="b", uid="", token="token-b", total_epochs=10)
    assert (await live.post(report(name="b"), token="token-b")).status == 202
    await live.hub.stop()  # writes what is pending: the latest accepted report
    assert [s["epoch"] for s in live.recorder.for_job("ml", "a")] == [1, 3]


async def test_unknown_forgotten_and_finished_jobs_are_dropped(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0)
    before = {r: reports_total(r) for r in ("unknown_job", "finished")}
    assert (await live.post(report(name="ghost"), token="whatever")).status == 404

    live.register(namespace="ml", name="a", uid="u1", token="token-a", total_epochs=10)
    assert (await live.post(report(name="a", epoch=1), token="token-a")).status == 202
    await live.recorder.wait_for(1, namespace="ml", name="a")
    live.hub.finish(namespace="ml", name="a")
    assert (await live.post(report(name="a", epoch=2), token="token-a")).status == 410

    live.register(namespace="ml", name="c", uid="u3", token="token-c", total_epochs=10)
    live.hub.forget(namespace="ml", name="c")
    assert (await live.post(report(name="c"), token="token-c")).status == 404

    await barrier(live)
    assert len(live.recorder.for_job("ml", "a")) == 1
    assert live.recorder.for_job("ml", "c") == []
    assert live.recorder.for_job("ml", "ghost") == []
    assert reports_total("unknown_job") - before["unknown_job"] == 2
    assert reports_total("finished") - before["finished"] == 1


async def test_expired_stale_and_old_incarnation_reports_are_refused(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0, max_report_age_s=60.0)
    live.register(namespace="ml", name="a", uid="u1", token="old-token", total_epochs=10)
    assert (await live.post(report(name="a", timestamp=time.time() - 3600), token="old-token")).status == 400
    assert (await live.post(report(name="a", epoch=2), token="old-token")).status == 202
    await live.recorder.wait_for(1, namespace="ml", name="a")
    assert (
        await live.post(report(name="a", epoch=1, timestamp=time.time() - 30), token="old-token")
    ).status == 409
    # The job is deleted and made again under the same name: the old token (its audience names
    # the old uid) is another job's.
    live.register(namespace="ml", name="a", uid="u2", token="new-token", total_epochs=10)
    assert (await live.post(report(name="a", epoch=5), token="old-token")).status == 403
    await barrier(live)
    assert [s["epoch"] for s in live.recorder.for_job("ml", "a")] == [2]


async def test_coalescing_latest_report_wins_when_the_window_closes(make_live: MakeLive) -> None:
    interval = 1.0
    live = await make_live(min_write_interval_s=interval)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)

    assert (await live.post(report(name="a", epoch=1), token="token-a")).status == 202
    await live.recorder.wait_for(1, namespace="ml", name="a")
    first_at = live.recorder.writes[-1][3]
    for epoch in (2, 3, 4):
        assert (await live.post(report(name="a", epoch=epoch), token="token-a")).status == 202
    assert time.monotonic() - first_at < interval, "machine too slow for this window"
    assert len(live.recorder.for_job("ml", "a")) == 1  # inside the window: nothing written yet
    assert holds_write(live.hub, namespace="ml", name="a")  # held for the window's end

    writes = await live.recorder.wait_for(2, namespace="ml", name="a")
    assert writes[1]["epoch"] == 4  # the latest report won
    second_at = [t for ns, n, _, t in live.recorder.writes if (ns, n) == ("ml", "a")][1]
    assert second_at - first_at >= interval * 0.95
    # One write per window, no more: nothing in flight, nothing held for later, so no third
    # write can come without a new report.
    await quiet(live.hub)
    assert not holds_write(live.hub, namespace="ml", name="a")
    assert len(live.recorder.for_job("ml", "a")) == 2


async def test_stage_change_and_final_bypass_the_window(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=60.0)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)
    assert (await live.post(report(name="a", epoch=1), token="token-a")).status == 202
    await live.recorder.wait_for(1, namespace="ml", name="a")
    assert (await live.post(report(name="a", epoch=2), token="token-a")).status == 202  # held back
    change = report(name="a", event="stage-start", stage="fine-tune", epoch=0, epochs_done=5)
    assert (await live.post(change, token="token-a")).status == 202
    writes = await live.recorder.wait_for(2, namespace="ml", name="a")
    assert writes[1]["stage"] == "fine-tune"
    assert writes[1]["progress"] == 50
    final = report(name="a", event="final", stage="fine-tune", epoch=5, epochs_done=10, result="succeeded")
    assert (await live.post(final, token="token-a")).status == 202
    writes = await live.recorder.wait_for(3, namespace="ml", name="a")
    assert writes[2]["progress"] == 100
    assert writes[2]["etaSeconds"] == 0


async def test_finish_flushes_the_pending_write_without_final_fields(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=60.0)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)
    assert (await live.post(report(name="a", epoch=1), token="token-a")).status == 202
    await live.recorder.wait_for(1, namespace="ml", name="a")
    assert (await live.post(report(name="a", epoch=4), token="token-a")).status == 202
    live.hub.finish(namespace="ml", name="a")
    writes = await live.recorder.wait_for(2, namespace="ml", name="a", timeout=5.0)
    assert writes[1]["epoch"] == 4
    assert "progress" not in writes[1]
    assert "etaSeconds" not in writes[1]


async def test_a_failing_status_write_is_counted_and_retried(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.2)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)
    errors_before = (
        metrics.REGISTRY.get_sample_value("finetune_reconcile_errors_total", {"handler": "progress"}) or 0
    )
    live.recorder.fail_next = 1
    assert (await live.post(report(name="a", epoch=1), token="token-a")).status == 202
    (status,) = await live.recorder.wait_for(1, namespace="ml", name="a")
    assert status["epoch"] == 1
    errors = metrics.REGISTRY.get_sample_value("finetune_reconcile_errors_total", {"handler": "progress"})
    assert errors == errors_before + 1
    # The hub still answers.
    assert (await live.post(report(name="a", epoch=2), token="token-a")).status == 202


async def test_accepted_report_updates_the_job_series(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0)
    live.register(namespace="mx", name="a", uid="", token="token-a", total_epochs=8)
    body = report(
        namespace="mx", name="a", epoch=2, total_epochs=8, metrics={"loss": 0.4, "val_accuracy": 0.7}
    )
    assert (await live.post(body, token="token-a")).status == 202
    get = metrics.REGISTRY.get_sample_value
    assert get("finetune_job_progress_ratio", {"namespace": "mx", "name": "a"}) == 0.25
    assert get("finetune_job_epoch", {"namespace": "mx", "name": "a", "stage": "head"}) == 2
    assert get("finetune_job_stage", {"namespace": "mx", "name": "a", "stage": "head"}) == 1
    assert get("finetune_job_stage", {"namespace": "mx", "name": "a", "stage": "fine-tune"}) == 0
    assert (
        get("finetune_job_loss", {"namespace": "mx", "name": "a", "stage": "head", "split": "train"}) == 0.4
    )
    assert (
        get("finetune_job_accuracy", {"namespace": "mx", "name": "a", "stage": "head", "split": "validation"})
        == 0.7
    )
    assert get("finetune_job_eta_seconds", {"namespace": "mx", "name": "a"}) == 12  # 6 epochs x 2 s
    assert get("finetune_job_images_per_second", {"namespace": "mx", "name": "a"}) == 120
    assert (
        get("finetune_job_last_progress_timestamp_seconds", {"namespace": "mx", "name": "a"}) or 0
    ) > time.time() - 60
    live.hub.forget(namespace="mx", name="a")
    assert get("finetune_job_progress_ratio", {"namespace": "mx", "name": "a"}) is None
    assert (
        get("finetune_job_loss", {"namespace": "mx", "name": "a", "stage": "head", "split": "train"}) is None
    )


async def test_stop_writes_what_is_pending(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=60.0)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)
    assert (await live.post(report(name="a", epoch=1), token="token-a")).status == 202
    await live.recorder.wait_for(1, namespace="ml", name="a")
    assert (await live.post(report(name="a", epoch=2), token="token-a")).status == 202
    assert len(live.recorder.for_job("ml", "a")) == 1
    await live.hub.stop()
    assert [s["epoch"] for s in live.recorder.for_job("ml", "a")] == [1, 2]


async def test_lifecycle_calls_from_another_thread_reach_the_loop(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0)
    await asyncio.to_thread(
        lambda: live.register(namespace="ml", name="t", uid="", token="token-t", total_epochs=4)
    )
    deadline = time.monotonic() + 5
    while not live.hub.is_registered(namespace="ml", name="t") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert (await live.post(report(name="t", stage_epochs=2, total_epochs=4), token="token-t")).status == 202
    await asyncio.to_thread(lambda: live.hub.forget(namespace="ml", name="t"))
    while live.hub.is_registered(namespace="ml", name="t") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert (await live.post(report(name="t", stage_epochs=2, total_epochs=4), token="token-t")).status == 404


async def test_eta_uses_the_current_stage_epochs_once_there_is_one(make_live: MakeLive) -> None:
    live = await make_live(min_write_interval_s=0.0)
    live.register(namespace="ml", name="a", uid="", token="token-a", total_epochs=10)
    for epoch in (1, 2, 3, 4, 5):
        body = report(name="a", epoch=epoch, epoch_seconds=2.0)
        assert (await live.post(body, token="token-a")).status == 202
    latest = await live.recorder.wait_latest(lambda s: s["epoch"] == 5, namespace="ml", name="a")
    assert latest["etaSeconds"] == 10  # 5 epochs left x 2 s
    start = report(
        name="a", event="stage-start", stage="fine-tune", epoch=0, epochs_done=5, epoch_seconds=None
    )
    assert (await live.post(start, token="token-a")).status == 202
    latest = await live.recorder.wait_latest(lambda s: s["stage"] == "fine-tune", namespace="ml", name="a")
    assert latest["etaSeconds"] == 10  # no fine-tune epoch yet: the head's pace
    slow = report(name="a", stage="fine-tune", epoch=1, epochs_done=6, epoch_seconds=8.0)
    assert (await live.post(slow, token="token-a")).status == 202
    latest = await live.recorder.wait_latest(lambda s: s["epoch"] == 1, namespace="ml", name="a")
    assert latest["etaSeconds"] == 32  # 4 epochs left x 8 s, the fine-tune pace


async def test_a_failing_token_check_is_503_and_writes_nothing(make_live: MakeLive) -> None:
    async def broken(*, token: str, namespace: str, name: str, uid: str) -> object:
        raise RuntimeError("apiserver unreachable")

    live = await make_live(min_write_interval_s=0.0, authenticate=broken)
    live.hub.register(namespace="ml", name="a", uid="u-a", total_epochs=10)
    before = reports_total("unavailable")
    resp = await live.post(report(name="a", uid="u-a"), token="token-a")
    assert resp.status == 503
    assert resp.headers.get("Retry-After") == "5"
    assert reports_total("unavailable") == before + 1
    assert live.recorder.for_job("ml", "a") == []
