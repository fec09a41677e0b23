"""The Argo CD health check of FineTuneJob, run in a real Lua interpreter (lupa) as Argo CD runs it.

Argo CD evaluates the script with the live object bound to the global `obj` and reads the
returned table's `status` and `message`. The argocd-cm snippet must carry the same Lua as the
.lua file, byte for byte.
"""

from __future__ import annotations

from typing import Any

import lupa
import pytest
import yaml
from deploy_helpers import DEPLOY

LUA_FILE = DEPLOY / "argocd" / "finetunejob-health.lua"
CM_FILE = DEPLOY / "argocd" / "argocd-cm-patch.yaml"
CM_KEY = "resource.customizations.health.finetune.dev_FineTuneJob"
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) the Lua returns for `obj`, evaluated like Argo CD does."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = _to_lua(runtime, obj)
    result = runtime.execute(LUA_FILE.read_text(encoding="utf-8"))
    return str(result["status"]), str(result["message"] or "")


def _job(*, generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "flowers", "namespace": "ml", "generation": generation},
        "spec": {"output": {"path": "/models/flowers"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


def _cond(kind: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "observedGeneration": 1}


RUNNING = {
    "observedGeneration": 1,
    "phase": "Running",
    "stage": "fine-tune",
    "epoch": 4,
    "totalEpochs": 30,
    "progress": 80,
    "conditions": [
        _cond("Ready", "False", "Training"),
        _cond("Running", "True", "FineTuning"),
        _cond("Complete", "False", "Training"),
        _cond("Failed", "False", "Training"),
        _cond("Suspended", "False", "Training"),
    ],
}

CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no status yet", _job(), "Progressing", "operator"),
    ("pending", _job(status={"observedGeneration": 1, "phase": "Pending"}), "Progressing", "Pending"),
    ("running", _job(status=RUNNING), "Progressing", "fine-tune epoch 4, 80%"),
    (
        "succeeded",
        _job(
            status={
                "observedGeneration": 1,
                "phase": "Succeeded",
                "progress": 100,
                "modelPath": "/models/flowers/model.keras",
                "conditions": [_cond("Ready", "True", "Succeeded"), _cond("Complete", "True", "Succeeded")],
            }
        ),
        "Healthy",
        "/models/flowers/model.keras",
    ),
    (
        "failed",
        _job(
            status={
                "observedGeneration": 1,
                "phase": "Failed",
                "reason": "DataError",
                "message": "no images in /data/train/roses",
                "conditions": [_cond("Failed", "True", "DataError", "no images in /data/train/roses")],
            }
        ),
        "Degraded",
        "DataError: no images in /data/train/roses",
    ),
    (
        "failed, reason only in the condition",
        _job(
            status={
                "observedGeneration": 1,
                "phase": "Failed",
                "conditions": [_cond("Failed", "True", "Diverged", "loss is NaN at epoch 3")],
            }
        ),
        "Degraded",
        "Diverged: loss is NaN at epoch 3",
    ),
    (
        "suspended",
        _job(status={"observedGeneration": 1, "phase": "Suspended", "message": "suspended by spec.suspend"}),
        "Suspended",
        "suspended",
    ),
    (
        "suspended condition while the phase still says Running",
        _job(status={**RUNNING, "conditions": [_cond("Suspended", "True", "JobSuspended")]}),
        "Suspended",
        "",
    ),
    (
        "new generation not yet observed (was Succeeded)",
        _job(generation=2, status={"observedGeneration": 1, "phase": "Succeeded"}),
        "Progressing",
        "generation 2",
    ),
    (
        "status written by progress reports before observedGeneration",
        _job(status={"phase": "Running", "stage": "head", "epoch": 1}),
        "Progressing",
        "generation 1",
    ),
]


@pytest.mark.parametrize(("obj", "expected", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_health(obj: dict[str, Any], expected: str, fragment: str) -> None:
    status, message = health(obj)
    assert status == expected, message
    assert fragment in message


def test_every_phase_maps_to_an_argo_status() -> None:
    for phase in ("Pending", "Running", "Suspended", "Succeeded", "Failed", None):
        status, _ = health(_job(status={"observedGeneration": 1, "phase": phase}))
        assert status in ARGO_STATUSES


def test_argocd_cm_snippet_is_the_lua_file() -> None:
    cm = yaml.safe_load(CM_FILE.read_text(encoding="utf-8"))
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["data"][CM_KEY] == LUA_FILE.read_text(encoding="utf-8")
