"""The operator's flags say what they do: which have an environment fallback, the default uid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from finetune_operator import settings

ROOT = Path(__file__).resolve().parents[3]
VALUES = {
    "--namespace": "x",
    "--trainer-image": "img:env",
    "--trainer-command": "python fake.py",
    "--progress-host": "127.0.0.2",
    "--progress-port": "1",
    "--progress-url": "http://x",
    "--metrics-host": "127.0.0.3",
    "--metrics-port": "2",
    "--health-port": "3",
    "--pending-timeout": "4",
    "--status-window": "5",
    "--run-as-user": "6",
    "--peering": "p",
}


def _help() -> None:
    with pytest.raises(SystemExit):
        settings.parse_args(["--help"], environ={})


def test_every_environment_variable_is_read_and_the_flag_wins_over_it() -> None:
    assert set(settings.ENVIRONMENT) == set(VALUES)
    env = {settings.ENVIRONMENT[flag]: value for flag, value in VALUES.items()}
    from_env = settings.parse_args([], environ=env)
    from_flags = settings.parse_args([f"{flag}={value}" for flag, value in VALUES.items()], environ={})
    assert from_env == from_flags
    assert from_env != settings.parse_args([], environ={})
    overridden = settings.parse_args(["--run-as-user=7"], environ=env)
    assert overridden.run_as_user == 7


def test_help_names_the_environment_variable_of_each_flag_and_says_which_have_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _help()
    text = " ".join(capsys.readouterr().out.split())
    for variable in settings.ENVIRONMENT.values():
        assert f"env {variable}" in text
    assert len(re.findall(r"no env\)", text)) == 2  # --priority and --verbose


def test_the_default_uid_is_the_images_uid() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    users = set(re.findall(r"^USER (\d+):(\d+)$", dockerfile, flags=re.M))
    assert users == {(str(settings.DEFAULT_RUN_AS_USER),) * 2}
    assert settings.parse_args([], environ={}).run_as_user == settings.DEFAULT_RUN_AS_USER
    assert settings.OperatorConfig().run_as_user == settings.DEFAULT_RUN_AS_USER
    values = yaml.safe_load((ROOT / "deploy/helm/finetune-operator/values.yaml").read_text(encoding="utf-8"))
    assert values["trainerRunAsUser"] == settings.DEFAULT_RUN_AS_USER
    deployment = (ROOT / "deploy/base/deployment.yaml").read_text(encoding="utf-8")
    assert f"--run-as-user={settings.DEFAULT_RUN_AS_USER}" in deployment
