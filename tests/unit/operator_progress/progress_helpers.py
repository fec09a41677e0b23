"""Helpers for the progress hub tests: the injected seams (`patch_status`, `authenticate`), report bodies, a live hub.

`TokenTable` stands in for `tokens.TokenChecker` (whose TokenReview needs a real API server:
tests/integration/test_progress_endpoint.py checks it there) with the same verdicts: the
job's own token is accepted, another known job's is forbidden, anything else unauthorized.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from finetune_contract import protocol
from finetune_operator.progress import ProgressHub
from finetune_operator.tokens import Verdict


async def quiet(hub: ProgressHub, *, timeout: float = 10.0) -> None:
    """Until no write the hub spawned is in flight (a proof of "nothing more", without sleeping).

    Reads the hub's private task set: every status write the hub makes runs as one of those
    tasks, or waits for one as a job's pending report with its timer (`holds_write`).
    """
    deadline = time.monotonic() + timeout
    while hub._tasks:
        assert time.monotonic() < deadline, f"hub writes still in flight after {timeout} s"
        await asyncio.wait(set(hub._tasks), timeout=max(0.0, deadline - time.monotonic()))


def holds_write(hub: ProgressHub, *, namespace: str, name: str) -> bool:
    """Whether the hub keeps a report of the job to write later (pending, or its timer set)."""
    job = hub._jobs.get((namespace, name))
    return job is not None and (job.pending is not None or job.timer is not None)


@dataclass
class StatusRecorder:
    """Stands in for the operator's `patch_status`: records every write (and can fail on demand)."""

    writes: list[tuple[str, str, dict[str, Any], float]] = field(default_factory=list)
    fail_next: int = 0

    async def __call__(self, *, namespace: str, name: str, status: dict[str, Any]) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RuntimeError("apiserver says no")
        self.writes.append((namespace, name, status, time.monotonic()))

    def for_job(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return [s for ns, n, s, _ in self.writes if (ns, n) == (namespace, name)]

    async def wait_latest(
        self, predicate: Callable[[dict[str, Any]], bool], *, namespace: str, name: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Until the job's latest write satisfies `predicate`; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.for_job(namespace, name)
            if got and predicate(got[-1]):
                return got[-1]
            await asyncio.sleep(0.01)
        raise AssertionError(f"{namespace}/{name}: no matching write in {self.for_job(namespace, name)}")

    async def wait_for(
        self, count: int, *, namespace: str, name: str, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.for_job(namespace, name)
            if len(got) >= count:
                return got
            await asyncio.sleep(0.01)
        raise AssertionError(
            f"{namespace}/{name}: wanted {count} writes, saw {self.for_job(namespace, name)}"
        )


@dataclass
class TokenTable:
    """Stands in for the operator's `authenticate`: one token per job (namespace, name, uid)."""

    tokens: dict[tuple[str, str, str], str] = field(default_factory=dict)
    calls: int = 0

    def add(self, *, namespace: str, name: str, uid: str, token: str) -> None:
        self.tokens[(namespace, name, uid)] = token

    async def __call__(self, *, token: str, namespace: str, name: str, uid: str) -> Verdict:
        self.calls += 1
        if self.tokens.get((namespace, name, uid)) == token:
            return Verdict("ok")
        if token in self.tokens.values():
            return Verdict("forbidden", "token is not valid for this job")
        return Verdict("unauthorized", "invalid token")


def report(
    *,
    namespace: str = "ml",
    name: str = "a",
    uid: str = "",
    event: protocol.Event = "epoch-end",
    stage: protocol.Stage = "head",
    epoch: int = 1,
    stage_epochs: int = 5,
    epochs_done: int | None = None,
    total_epochs: int = 10,
    metrics: dict[str, float] | None = None,
    epoch_seconds: float | None = 2.0,
    timestamp: float | None = None,
    result: str | None = None,
) -> dict[str, Any]:
    """A valid report body (camelCase, as the trainer sends it)."""
    body = protocol.ProgressReport.model_validate(
        {
            "namespace": namespace,
            "name": name,
            "uid": uid,
            "event": event,
            "stage": stage,
            "epoch": epoch,
            "stageEpochs": stage_epochs,
            "epochsDone": epoch if epochs_done is None else epochs_done,
            "totalEpochs": total_epochs,
            "metrics": metrics
            if metrics is not None
            else {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.75},
            "imagesPerSecond": 120.0,
            "epochSeconds": epoch_seconds,
            "timestamp": time.time() if timestamp is None else timestamp,
            "result": result,
        }
    )
    return body.model_dump(mode="json", by_alias=True)


@dataclass
class Live:
    hub: ProgressHub
    recorder: StatusRecorder
    url: str
    session: aiohttp.ClientSession
    tokens: TokenTable

    def register(self, *, namespace: str, name: str, uid: str, token: str, total_epochs: int) -> None:
        """Registers the job with the hub and its token with the stand-in checker."""
        self.tokens.add(namespace=namespace, name=name, uid=uid, token=token)
        self.hub.register(namespace=namespace, name=name, uid=uid, total_epochs=total_epochs)

    async def post(
        self, body: Any, *, token: str | None, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else None
        if raw is None:
            async with self.session.post(self.url, json=body, headers=hdrs) as resp:
                await resp.read()
                return resp
        async with self.session.post(self.url, data=data, headers=hdrs) as resp:
            await resp.read()
            return resp


MakeLive = Callable[..., Awaitable[Live]]
