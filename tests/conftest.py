"""Test tiers by folder: tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["fixtures.cluster"]

_TIERS = ("unit", "integration", "e2e")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
