"""Progress reports are untrusted: every bad number, string or type is a 400 naming the field,
and whatever the hub accepts builds a status the CRD's schema admits.

The classes of bad report: out of range (1e20, 10**20, -1, over the plan), non-finite (NaN,
Infinity, a number too large for a double), timestamps too old or in the future, huge strings,
wrong types. The property test at the end feeds hypothesis-made reports (most of them hostile)
through the same checks the hub runs and validates each accepted one's status against
`api.FineTuneJobStatus` and the CRD's own OpenAPI schema.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from finetune_contract import protocol
from finetune_contract.spec import TrainingSpec
from finetune_operator import api, metrics
from finetune_operator.progress import MAX_ETA_SECONDS, build_status, report_errors, stage_plan
from finetune_operator.tokens import Verdict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from progress_helpers import MakeLive, report
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[3]
NOW = 1_800_000_000.0
PLAN = {"head": 5, "fine-tune": 5}


def invalid_total() -> float:
    return metrics.REGISTRY.get_sample_value("finetune_progress_reports_total", {"result": "invalid"}) or 0.0


def raw(body: dict[str, Any], **replace: str) -> bytes:
    """The body as JSON with some values replaced by raw JSON text (NaN, 1e20, a 400-digit number)."""
    text = json.dumps({k: (f"@@{k}@@" if k in replace else v) for k, v in body.items()})
    for key, literal in replace.items():
        text = text.replace(f'"@@{key}@@"', literal)
    return text.encode()


# (what to send, the field the 400 must name): one per class of bad report.
BAD: list[tuple[str, dict[str, Any], dict[str, str], tuple[Any, ...]]] = [
    ("epoch 1e20", {}, {"epoch": "1e20"}, ("epoch",)),
    ("epoch 10**20", {}, {"epoch": str(10**20)}, ("epoch",)),
    ("epoch of 400 digits", {}, {"epoch": "9" * 400}, ("epoch",)),
    ("epoch -1", {"epoch": -1}, {}, ("epoch",)),
    ("epoch over the stage", {"epoch": 6}, {}, ("epoch",)),
    ("total epochs over the plan", {"totalEpochs": 11}, {}, ("totalEpochs",)),
    ("stage epochs over the plan", {"stageEpochs": 9, "epoch": 1}, {}, ("stageEpochs",)),
    ("epochs done over the total", {"epochsDone": 11}, {}, ("epochsDone",)),
    ("total epochs 1e20", {}, {"totalEpochs": "1e20"}, ("totalEpochs",)),
    ("timestamp NaN", {}, {"timestamp": "NaN"}, ("timestamp",)),
    ("timestamp Infinity", {}, {"timestamp": "Infinity"}, ("timestamp",)),
    ("timestamp -Infinity", {}, {"timestamp": "-Infinity"}, ("timestamp",)),
    ("timestamp 1e400", {}, {"timestamp": "1e400"}, ("timestamp",)),
    ("timestamp -1", {"timestamp": -1.0}, {}, ("timestamp",)),
    ("timestamp an hour old", {"timestamp": NOW - 3600}, {}, ("timestamp",)),
    ("timestamp ten minutes ahead", {"timestamp": NOW + 600}, {}, ("timestamp",)),
    ("timestamp year 3000", {"timestamp": 32503680000.0}, {}, ("timestamp",)),
    ("metric NaN", {}, {"metrics": '{"loss": NaN}'}, ("metrics", "loss")),
    ("metric Infinity", {}, {"metrics": '{"loss": Infinity}'}, ("metrics", "loss")),
    ("metric 1e300", {"metrics": {"loss": 1e300}}, {}, ("metrics", "loss")),
    ("best accuracy 1e20", {"bestValAccuracy": 1e20}, {}, ("bestValAccuracy",)),
    ("best accuracy NaN", {}, {"bestValAccuracy": "NaN"}, ("bestValAccuracy",)),
    ("images/s -1", {"imagesPerSecond": -1.0}, {}, ("imagesPerSecond",)),
    ("images/s Infinity", {}, {"imagesPerSecond": "Infinity"}, ("imagesPerSecond",)),
    ("images/s 1e20", {"imagesPerSecond": 1e20}, {}, ("imagesPerSecond",)),
    ("epoch seconds NaN", {}, {"epochSeconds": "NaN"}, ("epochSeconds",)),
    ("epoch seconds 1e300", {"epochSeconds": 1e300}, {}, ("epochSeconds",)),
    ("message of 10k characters", {"message": "x" * 10_000}, {}, ("message",)),
    ("namespace of 300 characters", {"namespace": "a" * 300}, {}, ("namespace",)),
    ("name with a slash", {"name": "../../secrets"}, {}, ("name",)),
    ("name with a newline", {"name": "a\nb"}, {}, ("name",)),
    ("uid with a query", {"uid": "u?x=1"}, {}, ("uid",)),
    ("metric name of 1k characters", {"metrics": {"l" * 1000: 0.5}}, {}, ("metrics", "l" * 1000, "[key]")),
    ("metric name with control characters", {"metrics": {"loss\u0000\u001b[31m": 0.5}}, {}, ("metrics", "loss\u0000\u001b[31m", "[key]")),
    ("33 metrics", {"metrics": {f"m{i}": 0.5 for i in range(33)}}, {}, ("metrics",)),
    ("epoch as a string", {"epoch": "1"}, {}, ("epoch",)),
    ("epoch as a float", {}, {"epoch": "1.0"}, ("epoch",)),
    ("epoch as a bool", {"epoch": True}, {}, ("epoch",)),
    ("epoch as null", {"epoch": None}, {}, ("epoch",)),
    ("timestamp as a string", {"timestamp": str(NOW)}, {}, ("timestamp",)),
    ("metrics as a list", {"metrics": [0.5]}, {}, ("metrics",)),
    ("metric as a string", {"metrics": {"loss": "0.5"}}, {}, ("metrics", "loss")),
    ("stage as a number", {"stage": 1}, {}, ("stage",)),
    ("images/s as an object", {"imagesPerSecond": {"$gt": 0}}, {}, ("imagesPerSecond",)),
]  # fmt: skip


@pytest.mark.parametrize(("what", "changes", "literals", "loc"), BAD, ids=[b[0] for b in BAD])
async def test_each_class_of_bad_report_is_a_400_naming_the_field(
    make_live: MakeLive, what: str, changes: dict[str, Any], literals: dict[str, str], loc: tuple[Any, ...]
) -> None:
    live = await make_live(min_write_interval_s=0.0, wall_clock=lambda: NOW)
    live.register(namespace="ml", name="a", uid="u-a", token="token-a", total_epochs=10)
    live.hub.register(namespace="ml", name="a", uid="u-a", total_epochs=10, stage_epochs=PLAN)
    body = {**report(name="a", uid="u-a", timestamp=NOW), **changes}
    before = invalid_total()
    async with live.session.post(
        live.url, data=raw(body, **literals), headers={"Authorization": "Bearer token-a"}
    ) as resp:
        assert resp.status == 400, what
        answer = await resp.json()
    assert answer["error"] == "invalid progress report"
    locs = [tuple(e["loc"]) for e in answer["detail"]]
    assert loc in locs, f"{what}: {locs}"
    assert invalid_total() == before + 1
    # A valid report still lands: nothing of the bad one was kept.
    assert (await live.post(report(name="a", uid="u-a", epoch=2, timestamp=NOW), token="token-a")).status == 202
    (status,) = await live.recorder.wait_for(1, namespace="ml", name="a")
    assert status["epoch"] == 2 and status["totalEpochs"] == 10


async def test_a_bad_report_with_a_wrong_token_is_401_not_400(make_live: MakeLive) -> None:
    """The plan is checked only for an authenticated report: a stranger learns nothing of it."""
    live = await make_live(min_write_interval_s=0.0, wall_clock=lambda: NOW)
    live.register(namespace="ml", name="a", uid="u-a", token="token-a", total_epochs=10)
    body = report(name="a", uid="u-a", timestamp=NOW, total_epochs=99, epochs_done=1)
    assert (await live.post(body, token="not-a-token")).status == 401
    assert (await live.post(body, token="token-a")).status == 400


async def test_the_plan_from_resolve_bounds_each_stage(make_live: MakeLive) -> None:
    from finetune_operator.progress import Registration

    async def resolve(*, namespace: str, name: str) -> Registration | None:
        return Registration(uid="u-r", total_epochs=7, stage_epochs={"head": 3, "fine-tune": 4})

    live = await make_live(min_write_interval_s=0.0, resolve=resolve, wall_clock=lambda: NOW)
    live.tokens.add(namespace="ml", name="r", uid="u-r", token="tok")
    fine = report(name="r", uid="u-r", stage="fine-tune", epoch=4, stage_epochs=4, epochs_done=7, total_epochs=7,
                  timestamp=NOW)  # fmt: skip
    assert (await live.post(fine, token="tok")).status == 202
    wrong = report(name="r", uid="u-r", stage="head", epoch=4, stage_epochs=4, epochs_done=4, total_epochs=7,
                   timestamp=NOW + 1)  # fmt: skip
    async with live.session.post(live.url, json=wrong, headers={"Authorization": "Bearer tok"}) as resp:
        assert resp.status == 400
        assert ["stageEpochs"] in [e["loc"] for e in (await resp.json())["detail"]]


async def test_the_token_check_over_its_limit_is_503_with_retry_after(make_live: MakeLive) -> None:
    async def busy(*, token: str, namespace: str, name: str, uid: str) -> Verdict:
        return Verdict("unavailable", "too many new tokens; try again", retry_after=2.5)

    live = await make_live(min_write_interval_s=0.0, authenticate=busy)
    live.hub.register(namespace="ml", name="a", uid="u-a", total_epochs=10)
    resp = await live.post(report(name="a", uid="u-a"), token="token-a")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "3"
    assert live.recorder.for_job("ml", "a") == []


def test_stage_plan_follows_the_spec() -> None:
    training = TrainingSpec.model_validate({"head": {"epochs": 3}, "fineTune": {"epochs": 4}})
    assert stage_plan(training) == {"head": 3, "fine-tune": 4}
    skipped = TrainingSpec.model_validate({"head": {"epochs": 3}, "fineTune": {"epochs": 4, "unfreezeLast": 0}})
    assert stage_plan(skipped) == {"head": 3, "fine-tune": 0}
    assert sum(stage_plan(skipped).values()) == skipped.total_epochs


# ----- any accepted report writes a valid status -----

_CRD = yaml.safe_load((ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
_STATUS_SCHEMA = _CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
_STATUS_FIELDS = {f.alias or name for name, f in api.FineTuneJobStatus.model_fields.items()}
_INT64 = 2**63 - 1

hostile_ints = st.one_of(
    st.integers(min_value=-3, max_value=12),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, protocol.MAX_EPOCHS, protocol.MAX_EPOCHS + 1, 2**31, 2**63]),
)
hostile_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=2.0),
    st.sampled_from([0.0, -0.0, 1e-320, 1e15, 1e300, -1e300]),
)
numbers = st.one_of(hostile_ints, hostile_floats)


@st.composite
def hostile_reports(draw: st.DrawFn) -> tuple[dict[str, Any], int, dict[str, int] | None]:
    """A plausible report for the job's plan with up to three fields made hostile, and the plan."""
    head, fine = draw(st.integers(0, 50)), draw(st.integers(0, 50))
    known = draw(st.booleans())
    total = head + fine if known else 0
    plan = {"head": head, "fine-tune": fine} if known and draw(st.booleans()) else None
    stage = draw(st.sampled_from(protocol.STAGES))
    stage_epochs = head if stage == "head" else fine
    epoch = draw(st.integers(0, stage_epochs))
    accuracy = st.floats(0, 1)
    body: dict[str, Any] = {
        "namespace": "ml",
        "name": "a",
        "event": draw(st.sampled_from(["stage-start", "epoch-end", "heartbeat", "stage-end", "final"])),
        "stage": stage,
        "epoch": epoch,
        "stageEpochs": stage_epochs,
        "epochsDone": draw(st.integers(0, head + fine)),
        "totalEpochs": head + fine,
        "metrics": {"loss": draw(st.floats(0, 1e6)), "accuracy": draw(accuracy), "val_accuracy": draw(accuracy)},
        "timestamp": draw(st.floats(NOW - 599, NOW + 59)),
    }
    for key, values in (("bestValAccuracy", accuracy), ("imagesPerSecond", st.floats(0, 1e6)),
                        ("epochSeconds", st.floats(0, 1e5))):  # fmt: skip
        if draw(st.booleans()):
            body[key] = draw(values)
    if body["event"] == "final":
        body["result"] = draw(st.sampled_from(["succeeded", "failed"]))
    fields = ["epoch", "stageEpochs", "epochsDone", "totalEpochs", "timestamp", "bestValAccuracy",
              "imagesPerSecond", "epochSeconds", "metric"]  # fmt: skip
    for field in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        if field == "metric":
            name = draw(st.sampled_from(["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "x" * 70]))
            body["metrics"][name] = draw(numbers)
        else:
            body[field] = draw(numbers)
    return body, total, plan


def assert_valid_status(status: dict[str, Any]) -> None:
    api.FineTuneJobStatus.model_validate(status)  # the model the CRD is rendered from
    jsonschema.Draft4Validator(_STATUS_SCHEMA).validate(status)  # the CRD's schema as the API server has it
    assert set(status) <= _STATUS_FIELDS, set(status) - _STATUS_FIELDS
    for key, value in status.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            assert 0 <= value <= _INT64, (key, value)
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
        if isinstance(value, str):
            assert len(value) <= 1024 and value.isprintable(), (key, value)
    for value in (status.get("metrics") or {}).values():
        assert math.isfinite(value)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hostile_reports(), recent=st.lists(st.floats(0, protocol.MAX_EPOCH_SECONDS), max_size=5),
       best=st.one_of(st.none(), st.floats(0, 1)))  # fmt: skip
def test_any_accepted_report_builds_a_status_the_crd_admits(
    case: tuple[dict[str, Any], int, dict[str, int] | None], recent: list[float], best: float | None
) -> None:
    body, total, plan = case
    wire = json.dumps(body, allow_nan=True).encode()  # what a hostile client can send
    try:
        parsed = protocol.ProgressReport.model_validate_json(wire, strict=True)
    except ValidationError:
        return
    if report_errors(report=parsed, total_epochs=total, stage_epochs=plan, now=NOW, max_age_s=600, max_skew_s=60):
        return
    status = build_status(
        report=parsed, total_epochs=total, recent_epoch_seconds=recent, best_val_accuracy=best, now=NOW
    )
    assert_valid_status(status)
    assert 0 <= status["progress"] <= 100
    assert status.get("etaSeconds", 0) <= MAX_ETA_SECONDS


def test_the_property_test_sees_accepted_reports() -> None:
    """The generator is not so hostile that nothing passes (else the property would be vacuous)."""
    accepted = 0

    @settings(max_examples=300, deadline=None, database=None)
    @given(case=hostile_reports())
    def count(case: tuple[dict[str, Any], int, dict[str, int] | None]) -> None:
        nonlocal accepted
        body, total, plan = case
        try:
            parsed = protocol.ProgressReport.model_validate_json(json.dumps(body).encode(), strict=True)
        except (ValidationError, ValueError):
            return
        if not report_errors(report=parsed, total_epochs=total, stage_epochs=plan, now=NOW, max_age_s=600,
                             max_skew_s=60):  # fmt: skip
            accepted += 1

    count()
    assert accepted >= 60, accepted  # about half


def test_the_largest_accepted_report_still_fits() -> None:
    body = report(
        epoch=protocol.MAX_EPOCHS,
        stage_epochs=protocol.MAX_EPOCHS,
        epochs_done=protocol.MAX_EPOCHS,
        total_epochs=protocol.MAX_EPOCHS,
        metrics={f"m{i}": -protocol.MAX_METRIC_MAGNITUDE for i in range(protocol.MAX_METRICS)},
        epoch_seconds=protocol.MAX_EPOCH_SECONDS,
        timestamp=protocol.MAX_TIMESTAMP,
    )
    parsed = protocol.ProgressReport.model_validate(body)
    status = build_status(
        report=parsed.model_copy(update={"epochs_done": 0}),
        total_epochs=protocol.MAX_EPOCHS,
        recent_epoch_seconds=[protocol.MAX_EPOCH_SECONDS],
        best_val_accuracy=1.0,
        now=protocol.MAX_TIMESTAMP,
    )
    assert_valid_status(status)
    assert status["etaSeconds"] == MAX_ETA_SECONDS
    assert len(json.dumps(status)) < 4096


def test_the_hub_clock_bounds_are_what_the_docs_say() -> None:
    parsed = protocol.ProgressReport.model_validate(report(timestamp=time.time()))
    for skew, ok in ((-599.0, True), (-601.0, False), (59.0, True), (61.0, False)):
        errors = report_errors(
            report=parsed.model_copy(update={"timestamp": NOW + skew}),
            total_epochs=10,
            stage_epochs=None,
            now=NOW,
            max_age_s=600,
            max_skew_s=60,
        )
        assert (not errors) == ok, (skew, errors)
