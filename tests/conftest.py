"""Test tiers by folder: tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e,
tests/chaos -> chaos (hostile input against the local control plane: `make test-chaos`)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["fixtures.cluster"]

_TIERS = ("unit", "integration", "e2e", "chaos")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: generated bad input and killed processes against the local control plane")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
