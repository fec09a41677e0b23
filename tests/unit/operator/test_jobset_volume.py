"""Which volume holds a multi-worker job's output path (actions.output_claim, pure): only a
PersistentVolumeClaim every worker mounts can; emptyDir, hostPath, no volume or a read-only mount are refused."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator import actions, api


def spec(volumes: list[dict[str, Any]], mounts: list[dict[str, Any]], out: str = "/models/flowers") -> api.FineTuneJobSpec:
    return api.FineTuneJobSpec.model_validate({
        "data": {"train": "/data/train", "validationSplit": 0.2}, "output": {"path": out},
        "runtime": {"workers": 2, "volumes": volumes, "volumeMounts": mounts},
    })  # fmt: skip


def test_the_claim_under_the_output_path_the_longest_mount_wins() -> None:
    vols = [{"name": "models", "persistentVolumeClaim": {"claimName": "shared"}}, {"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": "/models/tmp"}, {"name": "models", "mountPath": "/models"}]
    assert actions.output_claim(spec(vols, mounts)) == ("shared", None)
    claim, why = actions.output_claim(spec(vols, mounts, out="/models/tmp/x"))
    assert claim is None and why is not None and "volume scratch (emptyDir)" in why


@pytest.mark.parametrize(
    ("volume", "expected"),
    [({"name": "models", "emptyDir": {}}, "(emptyDir)"), ({"name": "models", "hostPath": {"path": "/srv"}}, "(hostPath)")],
)
def test_volumes_the_workers_do_not_share_are_refused_by_name(volume: dict[str, Any], expected: str) -> None:
    claim, why = actions.output_claim(spec([volume], [{"name": "models", "mountPath": "/models"}]))
    assert claim is None and why is not None
    assert "volume models" in why and expected in why and "ReadWriteMany" in why


def test_an_output_path_on_no_volume_is_refused() -> None:
    claim, why = actions.output_claim(spec([], []))
    assert claim is None and why is not None and "/models/flowers is on no volume" in why
    # /modelsX is not under /models
    claim, why = actions.output_claim(spec([{"name": "m", "persistentVolumeClaim": {"claimName": "c"}}],
                                           [{"name": "m", "mountPath": "/models"}], out="/modelsX/a"))  # fmt: skip
    assert claim is None and why is not None


def test_a_read_only_mount_is_refused() -> None:
    claim, why = actions.output_claim(spec([{"name": "m", "persistentVolumeClaim": {"claimName": "c"}}],
                                           [{"name": "m", "mountPath": "/models", "readOnly": True}]))  # fmt: skip
    assert claim is None and why is not None and "read-only" in why
