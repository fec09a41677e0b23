"""`finetune_jobs` is right after an operator restart: every reconcile records the job's phase.

The reconcile reads only the Kopf indexes here (a finished job needs no API call), so a
fresh `Operator` with hand-filled indexes stands in for a restarted process.
"""

from __future__ import annotations

from typing import Any

from finetune_operator import handlers, metrics


def _ftj(phase: str, *, generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"uid": f"uid-{phase}", "generation": generation, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"data": {"train": "/d", "validationSplit": 0.2}, "output": {"path": "/m"}},
        "status": {"observedGeneration": generation, "phase": phase, "reason": phase},
    }


def _jobs(namespace: str, phase: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("finetune_jobs", {"namespace": namespace, "phase": phase})


async def test_a_restarted_operator_counts_finished_jobs_it_does_not_touch() -> None:
    op = handlers.Operator()
    ns = "restart-metrics"
    op.ftjs = {(ns, "done"): [handlers.ftj_view(_ftj("Succeeded"))], (ns, "bad"): [handlers.ftj_view(_ftj("Failed"))]}
    op.jobs, op.pods = {}, {}
    assert _jobs(ns, "Succeeded") is None
    await op.reconcile((ns, "done"))
    await op.reconcile((ns, "bad"))
    assert _jobs(ns, "Succeeded") == 1
    assert _jobs(ns, "Failed") == 1
    # Idempotent: reconciling again changes nothing.
    await op.reconcile((ns, "done"))
    assert _jobs(ns, "Succeeded") == 1
    op.forget((ns, "done"), "uid-Succeeded")
    assert _jobs(ns, "Succeeded") == 0
    assert _jobs(ns, "Failed") == 1
    await op.client.close()


def test_repeating_a_phase_is_a_no_op_and_keeps_the_current_stage() -> None:
    ns = "repeat-phase"
    metrics.set_phase(namespace=ns, name="a", phase="Pending")
    metrics.observe_progress(
        namespace=ns, name="a", stage="head", epoch=1, progress_ratio=0.1, metrics={},
        images_per_second=None, eta_seconds=None, timestamp=1.7e9,
    )  # fmt: skip
    stage = {"namespace": ns, "name": "a", "stage": "head"}
    assert metrics.REGISTRY.get_sample_value("finetune_job_stage", stage) == 1
    metrics.set_phase(namespace=ns, name="a", phase="Pending")  # every reconcile calls it
    assert metrics.REGISTRY.get_sample_value("finetune_job_stage", stage) == 1
    assert _jobs(ns, "Pending") == 1
    metrics.set_phase(namespace=ns, name="a", phase="Succeeded")
    assert metrics.REGISTRY.get_sample_value("finetune_job_stage", stage) == 0
    assert (_jobs(ns, "Pending"), _jobs(ns, "Succeeded")) == (0, 1)
    metrics.set_phase(namespace=ns, name="a", phase=None)
    metrics.forget_job(namespace=ns, name="a")
