"""Status writes come from the typed status model (`api.FineTuneJobStatus`), not string-keyed dicts.

Before, `status.py` and `progress.py` built the status as dicts: a misspelt key
(`"etaSecnds"`) went into the merge patch and the API server pruned it without a word.
Now every write is a `FineTuneJobStatus` dumped by `api.status_patch`: an unknown field is a
mypy error where the model is built and a ValidationError at run time, and the field lists
(which fields the reconciler keeps, which the hub leaves to the final status) come from the
model's `WrittenBy` metadata.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from finetune_operator import api, crd
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[3]


def test_an_unknown_status_field_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="etaSecnds"):
        api.FineTuneJobStatus.model_validate({"phase": "Running", "etaSecnds": 3})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        api.FineTuneJobStatus.model_validate({"eta_secnds": 3})
    with pytest.raises(ValidationError, match="lastTransitionTme"):
        api.Condition.model_validate(
            {"type": "Ready", "status": "True", "reason": "Succeeded", "lastTransitionTme": "2026-01-01T00:00:00Z"}
        )
    with pytest.raises(ValidationError, match="phase"):
        api.FineTuneJobStatus.model_validate({"phase": "Runing"})


def test_a_misspelt_field_is_a_type_error(tmp_path: Path) -> None:
    """mypy (the project's strict settings) refuses a misspelt field or a wrong literal at the call."""
    # mypy is a lint tool (the dev group): the lowest-direct tier installs only the test group,
    # so there this check is left to the unit tier, which runs it.
    pytest.importorskip("mypy", reason="mypy is not installed (the lowest-direct tier); the unit tier runs this")
    snippet = tmp_path / "misspelt.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from finetune_operator import api

            api.FineTuneJobStatus(eta_secnds=3)
            api.FineTuneJobStatus(phase="Runing")
            api.Condition(type="Ready", status="Yes", reason="R", last_transition_time="t")
            api.FineTuneJobStatus(eta_seconds=3, phase="Running")
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--no-error-summary", str(snippet)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if "error:" in line]
    assert any(':4: error: Unexpected keyword argument "eta_secnds"' in e for e in errors), result.stdout
    assert any(":5: error:" in e and '"phase"' in e for e in errors), result.stdout
    assert any(":6: error:" in e and '"status"' in e for e in errors), result.stdout
    assert not any(":7: error:" in e for e in errors), result.stdout  # the right spelling passes
    assert len(errors) == 3, result.stdout


def test_status_patch_keeps_cleared_fields_and_leaves_out_unset_ones() -> None:
    written = api.status_patch(
        api.FineTuneJobStatus(phase="Failed", eta_seconds=None, observed_generation=2), writer="operator"
    )
    assert written == {"observedGeneration": 2, "phase": "Failed", "etaSeconds": None}  # null clears it
    assert api.status_patch(api.FineTuneJobStatus(), writer="operator") == {}
    hub = api.FineTuneJobStatus(stage="fine-tune", epoch=3, total_epochs=20, message="phase 2/2", progress=15)
    assert api.status_patch(hub, writer="progress", exclude=("message", "progress")) == {
        "stage": "fine-tune",
        "epoch": 3,
        "totalEpochs": 20,
    }


def test_status_patch_refuses_a_field_its_writer_does_not_own() -> None:
    with pytest.raises(ValueError, match="phase"):
        api.status_patch(api.FineTuneJobStatus(phase="Running"), writer="progress")
    with pytest.raises(ValueError, match="stage"):
        api.status_patch(api.FineTuneJobStatus(stage="head"), writer="operator")


def test_field_lists_come_from_the_model() -> None:
    # The lists that were written by hand before (status.OWNED_FIELDS, handlers._KEPT_STATUS,
    # progress._FINISH_STRIPPED), now derived from each field's WrittenBy.
    assert set(api.status_fields(writer="operator", only=True)) == {
        "observedGeneration", "phase", "reason", "attempts", "workers", "startTime", "completionTime", "modelPath",
        "conditions",
    }  # fmt: skip
    assert set(api.status_fields(writer="operator")) == {
        *api.status_fields(writer="operator", only=True), "progress", "etaSeconds", "message",
    }  # fmt: skip
    assert set(api.shared_status_fields()) == {"progress", "etaSeconds", "message"}
    every = {f.alias or n for n, f in api.FineTuneJobStatus.model_fields.items()}
    assert set(api.status_fields(writer="operator")) | set(api.status_fields(writer="progress")) == every


def test_every_status_field_is_in_the_crd() -> None:
    """What the model admits, the CRD keeps: no field of a write is pruned by the API server."""
    crd_fields = set(crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"])
    assert crd_fields == {f.alias or n for n, f in api.FineTuneJobStatus.model_fields.items()}


def test_a_field_set_later_is_validated_and_recorded() -> None:
    written = api.FineTuneJobStatus(phase="Running")
    written.eta_seconds = None  # set, so the patch clears it
    assert api.status_patch(written, writer="operator") == {"phase": "Running", "etaSeconds": None}
    with pytest.raises(ValidationError):
        written.progress = 101
    with pytest.raises(ValueError, match="eta_secnds"):
        written.eta_secnds = 3  # type: ignore[attr-defined]


def test_printer_columns_and_object_rules_come_from_the_models() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    columns = {c["jsonPath"]: c["name"] for c in version["additionalPrinterColumns"]}
    marked = {
        f".status.{f.alias or n}": m.name
        for n, f in api.FineTuneJobStatus.model_fields.items()
        for m in f.metadata
        if isinstance(m, api.PrinterColumn)
    }
    assert marked and set(marked.items()) <= set(columns.items())
    assert columns[".metadata.creationTimestamp"] == "Age"  # marked on api.FineTuneJob.metadata
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Stage", "Epoch", "Progress", "Val-Acc", "ETA", "Reason", "Age",
    ]  # fmt: skip
    assert version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"] == list(api.OBJECT_RULES)
