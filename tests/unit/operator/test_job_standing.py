"""`actions.standing`: how an existing Job of a FineTuneJob's name stands towards it (adopt, wait, delete, conflict)."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator import actions, builders

OWNER = builders.Owner(namespace="ml", name="flowers", uid="uid-new", labels={})


def job(*refs: dict[str, Any], deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "flowers", "uid": "job-uid", "ownerReferences": list(refs)}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta}


def ref(*, uid: str, name: str = "flowers", kind: str = "FineTuneJob", api: str = "finetune.dev/v1alpha1",
        controller: bool = True) -> dict[str, Any]:  # fmt: skip
    return {"apiVersion": api, "kind": kind, "name": name, "uid": uid, "controller": controller}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (job(ref(uid="uid-new")), "ours"),
        (job(ref(uid="uid-new"), deleting=True), "ours"),
        # Same name, another uid: that FineTuneJob was deleted (and this one created since).
        (job(ref(uid="uid-old")), "stale"),
        (job(ref(uid="uid-old", api="finetune.dev/v1beta1")), "stale"),
        (job(ref(uid="uid-old"), deleting=True), "going"),
        (job(ref(uid="x", kind="CronJob", api="batch/v1"), deleting=True), "going"),
        # Not a FineTuneJob of this name: someone else's Job.
        (job(), "foreign"),
        (job(ref(uid="uid-old", controller=False)), "foreign"),
        (job(ref(uid="x", kind="CronJob", api="batch/v1")), "foreign"),
        (job(ref(uid="uid-old", name="tulips")), "foreign"),
        (job(ref(uid="uid-old", api="other.dev/v1")), "foreign"),
    ],
    ids=["ours", "ours-deleting", "stale", "stale-other-version", "stale-going", "foreign-going", "no-owner",
         "not-controller", "cronjob", "other-name", "other-group"],
)
def test_standing(body: dict[str, Any], expected: str) -> None:
    assert actions.standing(body, owner=OWNER) == expected
