"""Import hygiene, the static list of Keras model names, the operator's own refusals, flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator import api, models, settings
from fixtures.imports import loaded_packages
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[3]


def test_operator_never_imports_tensorflow_or_keras() -> None:
    loaded = loaded_packages(
        "finetune_operator.handlers", "finetune_operator.__main__", "finetune_operator.crd",
        "finetune_operator.progress", "finetune_operator.metrics",
    )  # fmt: skip
    assert "finetune_operator" in loaded  # the probe sees real imports
    assert loaded & {"tensorflow", "keras"} == set()


def test_keras_application_names_match_the_installed_keras() -> None:
    code = "import keras, json; print(json.dumps([n for n in dir(keras.applications) if n[:1].isupper()]))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"TF_CPP_MIN_LOG_LEVEL": "3"}, check=False
    )
    if out.returncode != 0:
        pytest.skip(f"keras not importable here: {out.stderr[-200:]}")
    assert set(json.loads(out.stdout.strip().splitlines()[-1])) == models.KERAS_APPLICATIONS


BASE = {"data": {"train": "/d", "validationSplit": 0.2}, "output": {"path": "/m"}}


@pytest.mark.parametrize(
    ("name", "spec", "fragment"),
    [
        ("ok", BASE, None),
        ("bad-base", {**BASE, "model": {"base": "NoSuchNet"}}, "spec.model.base"),
        ("workers", {**BASE, "runtime": {"workers": 2}}, None),  # a JobSet
        ("w" * 47, {**BASE, "runtime": {"workers": 2}}, "metadata.name: at most 46 characters"),  # JobSet's pod names
        ("x" * 60, BASE, "metadata.name"),
        ("both", {**BASE, "data": {"train": "/d", "validation": "/v", "validationSplit": 0.1}}, "exactly one"),
        ("unknown-field", {**BASE, "bogus": 1}, "bogus"),
    ],
)
def test_operator_refusals(name: str, spec: dict[str, object], fragment: str | None) -> None:
    parsed, refusal = api.operator_refusal(name=name, spec=spec)
    if fragment is None:
        assert refusal is None and parsed is not None
    else:
        assert parsed is None and refusal is not None and fragment in refusal


def test_flags_and_environment() -> None:
    env = {"FINETUNE_NAMESPACES": "a, b", "FINETUNE_TRAINER_IMAGE": "img:env", "FINETUNE_PROGRESS_URL": "http://x"}
    config = settings.parse_args([], environ=env)
    assert config.namespaces == ("a", "b")
    assert (config.trainer_image, config.progress_url) == ("img:env", "http://x")
    flags = settings.parse_args(
        ["--namespace", "c", "--trainer-image", "i:f", "--trainer-command", "python fake.py", "--pending-timeout", "5"],
        environ=env,
    )
    assert flags.namespaces == ("c",) and flags.trainer_image == "i:f"
    assert flags.trainer_command == ("python", "fake.py") and flags.pending_timeout_s == 5.0
    defaults = settings.parse_args([], environ={})
    assert defaults.namespaces == () and defaults.trainer_image == settings.DEFAULT_TRAINER_IMAGE
    assert (defaults.progress_port, defaults.metrics_port, defaults.health_port) == (8081, 8080, 8082)
    assert defaults.progress_url is None


def _fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        out.add(key)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out |= _fields(annotation, f"{key}.")
    return out


def _keys(document: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in document.items():
        out.add(f"{prefix}{key}")
        if isinstance(value, dict) and key not in ("baseOptions", "resources", "affinity", "nodeSelector"):
            out |= _keys(value, f"{prefix}{key}.")
    return out


def test_full_example_is_valid_and_sets_every_field() -> None:
    document = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    spec = document["spec"]
    parsed, refusal = api.operator_refusal(name=document["metadata"]["name"], spec=spec)
    assert refusal is None and parsed is not None
    # validation and validationSplit are exclusive: the example names the other in a comment.
    missing = _fields(api.FineTuneJobSpec) - _keys(spec) - {"data.validationSplit"}
    assert missing == set()
