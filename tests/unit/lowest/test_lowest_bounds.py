"""The lower bounds in pyproject.toml are the versions `make test-lowest` installs and tests.

`make test-lowest` resolves the operator's and the (CPU) trainer's dependencies and the test
group with uv's `--resolution lowest-direct` into .venv-lowest and runs the operator-side
unit tests and the trainer's in-process ones there with FTO_LOWEST_DIRECT=1. A bound that another requirement overrules (say `aiohttp>=3.9`
while kopf itself needs 3.14) would be installed higher than it says, and the code never
tested at the bound: the second test fails on it. In other venvs only the first test runs.
"""

from __future__ import annotations

import importlib.metadata
import os
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# What the lowest tier installs: the core, the operator and trainer-cpu extras, the test group.
TIER = [
    *PYPROJECT["project"]["dependencies"],
    *PYPROJECT["project"]["optional-dependencies"]["operator"],
    *PYPROJECT["project"]["optional-dependencies"]["trainer-cpu"],
    *(r for r in PYPROJECT["dependency-groups"]["test"] if isinstance(r, str)),
]


def lower_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    return max(bounds) if bounds else None


@pytest.mark.parametrize("text", TIER)
def test_every_direct_dependency_of_the_tier_has_a_lower_bound(text: str) -> None:
    assert lower_bound(Requirement(text)) is not None, f"{text}: no `>=` bound, so nothing to test at"


@pytest.mark.skipif(os.environ.get("FTO_LOWEST_DIRECT") != "1", reason="only in `make test-lowest`")
@pytest.mark.parametrize("text", TIER)
def test_installed_version_is_the_lower_bound(text: str) -> None:
    requirement = Requirement(text)
    bound = lower_bound(requirement)
    installed = Version(importlib.metadata.version(requirement.name))
    assert installed == bound, (
        f"{requirement.name} resolves to {installed} at lowest-direct, not to its bound {bound}: "
        "another requirement needs more (raise the bound to what the code is tested with)"
    )
