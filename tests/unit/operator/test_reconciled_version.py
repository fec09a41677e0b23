"""`finetune_job_reconciled_resource_version`: the version of a job the latest completed
reconcile pass acted on, the positive that integration tests wait on to prove a negative
("the operator has considered the job since X, and did nothing")."""

from __future__ import annotations

from typing import Any

from finetune_operator import handlers, metrics


def _ftj(resource_version: str) -> dict[str, Any]:
    return {
        "metadata": {"uid": "uid-rv", "generation": 1, "resourceVersion": resource_version},
        "spec": {"data": {"train": "/d", "validationSplit": 0.2}, "output": {"path": "/m"}},
        "status": {"observedGeneration": 1, "phase": "Succeeded", "reason": "Succeeded"},
    }


def _reconciled(namespace: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(
        "finetune_job_reconciled_resource_version", {"namespace": namespace, "name": "done"}
    )


async def test_each_completed_pass_shows_the_version_it_acted_on_and_forget_removes_it() -> None:
    op = handlers.Operator()
    ns = "reconciled-rv"
    op.jobs, op.pods = {}, {}
    op.ftjs = {(ns, "done"): [handlers.ftj_view(_ftj("41"))]}
    assert _reconciled(ns) is None
    await op.reconcile((ns, "done"))
    assert _reconciled(ns) == 41
    op.ftjs = {(ns, "done"): [handlers.ftj_view(_ftj("57"))]}
    await op.reconcile((ns, "done"))
    assert _reconciled(ns) == 57
    op.forget((ns, "done"), "uid-rv")
    assert _reconciled(ns) is None
    await op.client.close()


def test_a_version_that_is_not_an_integer_is_not_shown() -> None:
    metrics.job_reconciled(namespace="opaque-rv", name="done", resource_version="abc/1")
    assert _reconciled("opaque-rv") is None
