"""Polling with a timeout: what every wait of the test bed and its tests is made of (no sleeps
where a condition can be checked)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["WaitTimeout", "wait_until"]

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """`wait_until` gave up; `last` is what the probe returned last."""

    def __init__(self, *, what: str, timeout: float, last: object) -> None:
        super().__init__(f"timed out after {timeout:.0f}s: {what} (last value: {last!r})")
        self.what = what
        self.timeout = timeout
        self.last = last


def wait_until(probe: Callable[[], T], *, timeout: float, what: str = "a condition", interval: float = 0.2) -> T:
    """Calls `probe` until it returns something truthy and returns that; raises WaitTimeout once
    `timeout` seconds have passed (the probe is called once more at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(what=what, timeout=timeout, last=last)
        time.sleep(interval)
