"""The progress endpoint: trainer reports in, coalesced status writes out.

`ProgressHub` is an aiohttp server inside the operator's own event loop, on a port of its
own, that takes `POST /v1/progress` (`protocol.PROGRESS_PATH`) from trainer pods.

Every report passes, in order:

1. size: a body over `max_body_bytes` is refused with 413, by its Content-Length before
   reading and again while reading (chunked bodies have no length);
2. a bearer token must be present (401);
3. the body must be a valid `protocol.ProgressReport`, parsed strictly (400, with pydantic's
   errors: every number finite and in range, every string bounded, no "5" for 5);
4. the job the body names must be registered (404, `unknown_job`), and the token must be
   that job's: the injected `authenticate` (`tokens.TokenChecker`: a TokenReview with the
   job's own audience, then the token's pod must belong to the job) answers 401 for an
   invalid token and 403 for another job's, so a credential for job A can never write job B
   (503 with Retry-After when the check itself fails or is over its rate limit);
5. reports for a finished job are dropped (410);
6. a per-job token bucket (`rate_per_s`, `burst`) answers 429 with Retry-After;
7. what only the hub knows (`report_errors`, 400 naming the field): the epochs must fit the
   job's plan from its spec (the total as registered, each stage's epochs when known, the
   epoch within its stage), and the timestamp must be at most `max_report_age_s` old and at
   most `max_clock_skew_s` ahead of the operator's clock;
8. a report older than the job's latest accepted one is stale (409).

So whatever is accepted builds a status that the CRD's schema (`api.FineTuneJobStatus`)
admits: no report can make a status write fail. The status is that model itself
(`progress_status`), dumped as a merge patch by `api.status_patch`: a field the model does
not have, or one the operator owns, is an error here, never a key the API server prunes.

Every outcome is counted in `finetune_progress_reports_total{result}`; a refused report
changes nothing else.

An accepted report updates the job's Prometheus series at once and becomes the job's
pending status. The status is written at once when the job's status was last written at
least `min_write_interval_s` ago, or when the report changes the stage or is the final one;
otherwise one timer per job writes the latest pending status when the window closes
(latest report wins). Writes of one job are serialised, so they land in order. The hub never
talks to Kubernetes itself: the operator injects `patch_status` (a JSON merge patch of the
status subresource; it also counts `finetune_status_writes_total{source="progress"}`, the
hub does not, so a write is counted once); a failing write is logged, counted in
`finetune_reconcile_errors_total{handler="progress"}` and retried at the next window a few
times, and never reaches the HTTP client.

Several replicas: only the active (Kopf peering) replica reconciles, so only it registers
jobs, but the Service spreads reports over every replica. The operator therefore injects
`resolve` too: for a report naming a job the hub does not know, the hub asks it once (a read
of the FineTuneJob) and, if the job exists and has not
finished, registers it as *resolved* and goes on with the usual checks. Lookups are
deduplicated per job, at most `max_resolves` run at a time (more are refused at once, not
queued), and each job is looked up at most once per `resolve_ttl_s` (a negative cache), so a
flood of made-up names costs the API server nothing more. A resolved job writes the status
like a registered one but adds no per-job metric series (the active replica's /metrics owns
those), and it is dropped after `resolved_idle_s` without reports; `register` by the
operator turns it into a registered one.

All methods are meant to be called from the operator's event loop (Kopf's async handlers);
a call from another thread is handed to the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import http_exceptions, web
from finetune_contract import protocol
from finetune_contract.spec import TrainingSpec
from pydantic import ValidationError

from finetune_operator import api, metrics

if TYPE_CHECKING:
    from finetune_operator.tokens import Verdict

__all__ = [
    "MAX_ETA_SECONDS",
    "Authenticate",
    "PatchStatus",
    "ProgressHub",
    "Registration",
    "Resolve",
    "build_status",
    "progress_status",
    "report_errors",
    "stage_plan",
]

logger = logging.getLogger(__name__)


class _MalformedRequests(logging.Filter):
    """Turns aiohttp's traceback for a malformed request (a 10 KB header, garbage bytes) into one warning.

    aiohttp answers such a request with 400 itself; its error log with a traceback would
    only let any client fill the operator's log with tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.BadHttpMessage):
            record.msg = f"{record.getMessage()}: refused a malformed request: {type(exc).__name__}"
            record.args = None
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


http_logger = logging.getLogger(f"{__name__}.http")
http_logger.addFilter(_MalformedRequests())

PatchStatus = Callable[..., Awaitable[None]]
"""`async def patch_status(*, namespace: str, name: str, status: dict[str, Any]) -> None`."""


@dataclass(frozen=True)
class Registration:
    """What `resolve` returns for a job this replica does not know: what `register` takes."""

    uid: str
    total_epochs: int
    stage_epochs: Mapping[str, int] | None = None  # planned epochs per stage (`stage_plan`), when known


def stage_plan(training: TrainingSpec) -> dict[str, int]:
    """Planned epochs of each stage, as the trainer reports them in `stageEpochs` (pure).

    Phase 2 runs only when it unfreezes layers, so it plans no epochs otherwise (like
    `TrainingSpec.total_epochs`).
    """
    fine_tune = training.fine_tune.epochs if training.fine_tune.unfreeze_last > 0 else 0
    return {"head": training.head.epochs, "fine-tune": fine_tune}


Authenticate = Callable[..., Awaitable["Verdict"]]
"""`async def authenticate(*, token: str, namespace: str, name: str, uid: str) -> tokens.Verdict`."""

Resolve = Callable[..., Awaitable[Registration | None]]
"""`async def resolve(*, namespace: str, name: str) -> Registration | None` (None: no such running job)."""

_RECENT_EPOCHS = 5  # epoch durations the ETA averages over
_MAX_WRITE_RETRIES = 5  # consecutive failed writes of one job before its pending status is dropped
_FINISH_STRIPPED = api.shared_status_fields()  # progress, etaSeconds, message: the operator's final status owns these
_MAX_LOOKED_UP = 4096  # entries of the lookup (negative) cache
MAX_ETA_SECONDS = 10 * 366 * 86400  # etaSeconds is capped at ten years


@dataclass
class _Job:
    namespace: str
    name: str
    uid: str
    total_epochs: int
    stage_epochs: Mapping[str, int] | None
    tokens: float
    refilled_at: float
    finished: bool = False
    resolved: bool = False  # learnt through `resolve` (another replica reconciles it), not `register`
    last_seen: float = 0.0  # monotonic time of the last accepted report
    stage: str | None = None
    last_timestamp: float = -math.inf
    durations: deque[tuple[str, float]] = field(default_factory=lambda: deque(maxlen=_RECENT_EPOCHS))
    best_val_accuracy: float | None = None
    last_write_at: float | None = None
    pending: api.FineTuneJobStatus | None = None
    failures: int = 0
    timer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class _Refusal:
    result: str
    status: int
    message: str
    detail: Any = None
    headers: dict[str, str] | None = None


class ProgressHub:
    """The operator's progress endpoint and the per-job state behind it."""

    def __init__(
        self,
        *,
        patch_status: PatchStatus,
        authenticate: Authenticate,
        min_write_interval_s: float = 5.0,
        max_body_bytes: int = protocol.MAX_REPORT_BYTES,
        rate_per_s: float = 2.0,
        burst: int = 10,
        max_report_age_s: float = 600.0,
        max_clock_skew_s: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
        resolve: Resolve | None = None,
        max_resolves: int = 4,
        resolve_ttl_s: float = 30.0,
        resolved_idle_s: float = 600.0,
    ) -> None:
        self._patch_status = patch_status
        self._authenticate = authenticate
        self._interval = float(min_write_interval_s)
        self._max_body = int(max_body_bytes)
        self._rate = float(rate_per_s)
        self._burst = int(burst)
        self._max_age = float(max_report_age_s)
        self._max_skew = float(max_clock_skew_s)
        self._wall = wall_clock
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._resolve = resolve
        self._max_resolves = int(max_resolves)
        self._resolve_ttl = float(resolve_ttl_s)
        self._resolved_idle = float(resolved_idle_s)
        self._resolving: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._looked_up: OrderedDict[tuple[str, str], float] = OrderedDict()  # key -> no lookup before
        self._swept_at = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._runner: web.AppRunner | None = None
        self.writes = 0  # status writes done (successful), for benchmarks and tests

    # ---- job lifecycle (called by the operator's handlers) ----

    def register(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        total_epochs: int,
        stage_epochs: Mapping[str, int] | None = None,
    ) -> None:
        """Accept reports for this job from now on (on create, adopt and resume).

        `total_epochs` is the job's plan (0: unknown), `stage_epochs` each stage's planned
        epochs (`stage_plan`; None: unknown): reports must fit them. Registering again updates
        the plan; a new uid (the job was deleted and made again under the same name) starts
        from a clean state.
        """
        plan = dict(stage_epochs) if stage_epochs is not None else None
        self._in_loop(lambda: self._register(namespace, name, uid, total_epochs, plan, resolved=False))

    def finish(self, *, namespace: str, name: str) -> None:
        """The job reached Succeeded or Failed: flush its pending write, drop later reports.

        The flushed write leaves out `progress`, `etaSeconds` and `message`, which the
        operator's final status owns, so it cannot undo that status whichever lands first.
        """
        self._in_loop(lambda: self._finish(namespace, name))

    def forget(self, *, namespace: str, name: str) -> None:
        """The FineTuneJob was deleted: drop its state, pending write and metric series."""
        self._in_loop(lambda: self._forget(namespace, name))

    def is_registered(self, *, namespace: str, name: str) -> bool:
        """Whether reports for this job are taken (registered and not forgotten)."""
        return (namespace, name) in self._jobs

    # ---- server ----

    async def start(self, *, host: str, port: int) -> int:
        """Serve the endpoint from the running event loop; return the bound port (0 picks one)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        app = web.Application()
        app.router.add_post(protocol.PROGRESS_PATH, self._handle)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=http_logger)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        bound = runner.addresses[0]
        logger.info("progress endpoint listening on %s:%s%s", host, bound[1], protocol.PROGRESS_PATH)
        return int(bound[1])

    async def stop(self) -> None:
        """Stop serving, then write what is pending (best effort, at most a few seconds)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for lookup in list(self._resolving.values()):
            lookup.cancel()
        for job in list(self._jobs.values()):
            if job.pending is not None:
                _cancel(job)
                self._spawn(self._flush(job))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        for job in self._jobs.values():
            _cancel(job)
        for task in list(self._tasks):
            task.cancel()

    # ---- request handling ----

    async def _healthz(self, request: web.Request) -> web.Response:
        del request
        return web.Response(text="ok\n")

    async def _handle(self, request: web.Request) -> web.Response:
        outcome = await self._accept(request)
        if isinstance(outcome, _Refusal):
            metrics.progress_report(result=outcome.result)
            logger.debug("progress report refused (%s): %s", outcome.result, outcome.message)
            body: dict[str, Any] = {"error": outcome.message}
            if outcome.detail is not None:
                body["detail"] = outcome.detail
            return web.json_response(body, status=outcome.status, headers=outcome.headers)
        metrics.progress_report(result="accepted")
        return web.json_response({"accepted": True}, status=202)

    async def _accept(self, request: web.Request) -> _Refusal | None:
        length = request.content_length
        if length is not None and length > self._max_body:
            return _Refusal("too_large", 413, f"body over {self._max_body} bytes")
        token = _bearer(request.headers.get("Authorization", ""))
        if token is None:
            return _Refusal(
                "unauthorized", 401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        body = bytearray()
        while chunk := await request.content.read(65536):
            body += chunk
            if len(body) > self._max_body:
                return _Refusal("too_large", 413, f"body over {self._max_body} bytes")
        try:
            report = protocol.ProgressReport.model_validate_json(bytes(body), strict=True)
        except ValidationError as exc:
            detail = json.loads(exc.json(include_url=False, include_input=False))
            return _Refusal("invalid", 400, "invalid progress report", detail=detail)

        key = (report.namespace, report.name)
        job = self._jobs.get(key)
        if job is None or (job.resolved and report.uid and job.uid and report.uid != job.uid):
            # Unknown here (another replica reconciles it?) or a newer incarnation: ask once.
            await self._lookup(key)
            job = self._jobs.get(key)
        if job is None:
            return _Refusal("unknown_job", 404, "no such job")
        try:
            verdict = await self._authenticate(
                token=token.decode(), namespace=job.namespace, name=job.name, uid=job.uid
            )
        except Exception as exc:
            logger.warning("could not check the progress token of %s/%s: %s", *key, exc)
            return _Refusal("unavailable", 503, "could not check the token; try again", headers={"Retry-After": "5"})
        if verdict.result == "unavailable":  # the token checks are over their limit: come back later
            retry = str(max(1, math.ceil(verdict.retry_after or 5.0)))
            return _Refusal("unavailable", 503, verdict.message or "try again", headers={"Retry-After": retry})
        if not verdict.ok:
            headers = {"WWW-Authenticate": "Bearer"} if verdict.result == "unauthorized" else None
            status_code = 401 if verdict.result == "unauthorized" else 403
            return _Refusal(verdict.result, status_code, verdict.message, headers=headers)
        if report.uid and job.uid and report.uid != job.uid:
            return _Refusal("forbidden", 403, "report is for another incarnation of this job")
        if job.finished:
            return _Refusal("finished", 410, "job has finished")
        retry_after = self._take_token(job)
        if retry_after is not None:
            return _Refusal(
                "rate_limited",
                429,
                "too many reports",
                headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
            )
        now = self._wall()
        errors = report_errors(
            report=report,
            total_epochs=job.total_epochs,
            stage_epochs=job.stage_epochs,
            now=now,
            max_age_s=self._max_age,
            max_skew_s=self._max_skew,
        )
        if errors:
            return _Refusal("invalid", 400, "invalid progress report", detail=errors)
        if report.timestamp < job.last_timestamp:
            return _Refusal("invalid", 409, "stale report (older than the latest accepted one)")

        self._fold(job, report, now)
        return None

    async def _lookup(self, key: tuple[str, str]) -> None:
        """Resolve and register an unknown job, at most once per `resolve_ttl_s` and job."""
        if self._resolve is None:
            return
        now = time.monotonic()
        self._sweep(now)
        task = self._resolving.get(key)
        if task is None:
            if self._looked_up.get(key, -math.inf) > now or len(self._resolving) >= self._max_resolves:
                return
            self._looked_up.pop(key, None)
            self._looked_up[key] = now + self._resolve_ttl
            while len(self._looked_up) > _MAX_LOOKED_UP:
                self._looked_up.popitem(last=False)
            task = asyncio.get_running_loop().create_task(self._resolve_job(key))
            self._resolving[key] = task
            task.add_done_callback(lambda _: self._resolving.pop(key, None))
        await asyncio.shield(task)

    async def _resolve_job(self, key: tuple[str, str]) -> None:
        assert self._resolve is not None
        try:
            found = await self._resolve(namespace=key[0], name=key[1])
        except Exception:
            metrics.reconcile_error(handler="progress")
            logger.warning("looking up %s/%s for a progress report failed", *key, exc_info=True)
            return
        if found is None:
            return
        current = self._jobs.get(key)
        if current is not None and not current.resolved:
            return  # the operator registered it meanwhile: its registration wins
        plan = dict(found.stage_epochs) if found.stage_epochs is not None else None
        self._register(key[0], key[1], found.uid, found.total_epochs, plan, resolved=True)

    def _sweep(self, now: float) -> None:
        """Drop resolved jobs without reports for `resolved_idle_s` (checked at most once a minute)."""
        if now - self._swept_at < min(60.0, self._resolved_idle):
            return
        self._swept_at = now
        for key, job in list(self._jobs.items()):
            if job.resolved and job.pending is None and now - job.last_seen > self._resolved_idle:
                _cancel(job)
                del self._jobs[key]

    def _take_token(self, job: _Job) -> float | None:
        now = time.monotonic()
        job.tokens = min(float(self._burst), job.tokens + (now - job.refilled_at) * self._rate)
        job.refilled_at = now
        if job.tokens >= 1.0:
            job.tokens -= 1.0
            return None
        return (1.0 - job.tokens) / self._rate if self._rate > 0 else 60.0

    # ---- folding a report into state, metrics and the pending write ----

    def _fold(self, job: _Job, report: protocol.ProgressReport, now: float) -> None:
        job.last_timestamp = report.timestamp
        job.last_seen = time.monotonic()
        if report.event == "epoch-end" and report.epoch_seconds is not None and report.epoch_seconds > 0:
            job.durations.append((report.stage, report.epoch_seconds))
        val_acc = report.metrics.get("val_accuracy")
        for candidate in (report.best_val_accuracy, val_acc):
            if candidate is not None and math.isfinite(candidate):
                best = job.best_val_accuracy
                job.best_val_accuracy = candidate if best is None else max(best, candidate)
        stage_changed = job.stage is not None and report.stage != job.stage
        job.stage = report.stage

        status = progress_status(
            report=report,
            total_epochs=job.total_epochs,
            # The current stage's epochs once there is one (fine-tune epochs are slower).
            recent_epoch_seconds=[d for s, d in job.durations if s == report.stage]
            or [d for _, d in job.durations],
            best_val_accuracy=job.best_val_accuracy,
            now=now,
        )
        total = status.total_epochs or 0
        done = min(report.epochs_done, total) if total else 0
        if not job.resolved:  # per-job series come from the replica that reconciles the job
            metrics.observe_progress(
                namespace=job.namespace,
                name=job.name,
                stage=report.stage,
                epoch=report.epoch,
                progress_ratio=(done / total) if total else 0.0,
                metrics=report.metrics,
                images_per_second=report.images_per_second,
                eta_seconds=status.eta_seconds,
                timestamp=now,
            )
        job.pending = status
        self._schedule(job, urgent=stage_changed or report.event == "final")

    def _schedule(self, job: _Job, *, urgent: bool) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if urgent or job.last_write_at is None or now - job.last_write_at >= self._interval:
            _cancel(job)
            self._spawn(self._flush(job))
        elif job.timer is None:
            delay = job.last_write_at + self._interval - now
            job.timer = loop.call_later(delay, self._on_timer, job)

    def _on_timer(self, job: _Job) -> None:
        job.timer = None
        self._spawn(self._flush(job))

    async def _flush(self, job: _Job) -> None:
        async with job.lock:
            status = job.pending
            job.pending = None
            if status is None or self._jobs.get((job.namespace, job.name)) is not job:
                return
            _cancel(job)
            patch = api.status_patch(status, writer="progress", exclude=_FINISH_STRIPPED if job.finished else ())
            loop = asyncio.get_running_loop()
            job.last_write_at = loop.time()
            try:
                await self._patch_status(namespace=job.namespace, name=job.name, status=patch)
            except asyncio.CancelledError:
                raise
            except Exception:
                job.failures += 1
                metrics.reconcile_error(handler="progress")
                logger.warning(
                    "status write for %s/%s failed (%d in a row)",
                    job.namespace,
                    job.name,
                    job.failures,
                    exc_info=True,
                )
                if job.pending is None and job.failures < _MAX_WRITE_RETRIES:
                    job.pending = status
                    if job.timer is None:
                        job.timer = loop.call_later(self._interval, self._on_timer, job)
                return
            job.failures = 0
            self.writes += 1  # finetune_status_writes_total{source="progress"} is counted by patch_status

    # ---- lifecycle internals (always on the loop) ----

    def _register(
        self,
        namespace: str,
        name: str,
        uid: str,
        total_epochs: int,
        stage_epochs: dict[str, int] | None,
        *,
        resolved: bool,
    ) -> None:
        key = (namespace, name)
        job = self._jobs.get(key)
        if job is not None and job.uid and uid and job.uid != uid:
            self._forget(namespace, name)
            job = None
        if job is None:
            self._jobs[key] = _Job(
                namespace=namespace,
                name=name,
                uid=uid,
                total_epochs=int(total_epochs),
                stage_epochs=stage_epochs,
                tokens=float(self._burst),
                refilled_at=time.monotonic(),
                resolved=resolved,
                last_seen=time.monotonic(),
            )
            return
        job.resolved = job.resolved and resolved
        job.uid = uid or job.uid
        job.total_epochs = int(total_epochs)
        job.stage_epochs = stage_epochs

    def _finish(self, namespace: str, name: str) -> None:
        job = self._jobs.get((namespace, name))
        if job is None or job.finished:
            return
        job.finished = True
        if job.pending is not None:
            _cancel(job)
            self._spawn(self._flush(job))

    def _forget(self, namespace: str, name: str) -> None:
        job = self._jobs.pop((namespace, name), None)
        if job is not None:
            _cancel(job)
            job.pending = None
        metrics.forget_job(namespace=namespace, name=name)

    def _in_loop(self, fn: Callable[[], None]) -> None:
        if self._loop is None or self._loop_thread == threading.get_ident() or self._loop.is_closed():
            fn()
        else:
            self._loop.call_soon_threadsafe(fn)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def report_errors(
    *,
    report: protocol.ProgressReport,
    total_epochs: int,
    stage_epochs: Mapping[str, int] | None,
    now: float,
    max_age_s: float,
    max_skew_s: float,
) -> list[dict[str, Any]]:
    """Why a well-formed report cannot be true for this job, in pydantic's error shape (pure).

    Each error names the field (`loc`, as on the wire). `total_epochs` is the job's plan (0:
    unknown, then only the report's own figures must agree), `stage_epochs` each stage's plan
    (None: unknown); `now` is the operator's clock, which the timestamp may trail by at most
    `max_age_s` and lead by at most `max_skew_s`. An empty list: the report may be folded in.
    """
    errors: list[dict[str, Any]] = []

    def error(field: str, kind: str, msg: str) -> None:
        errors.append({"type": kind, "loc": [field], "msg": msg})

    total = report.total_epochs
    if total_epochs > 0 and total != total_epochs:
        error("totalEpochs", "plan_mismatch", f"the job plans {total_epochs} epochs, not {total}")
    if report.epochs_done > total:
        error("epochsDone", "out_of_range", f"{report.epochs_done} done of {total} planned epochs")
    planned = None if stage_epochs is None else stage_epochs.get(report.stage)
    if planned is not None and report.stage_epochs != planned:
        error("stageEpochs", "plan_mismatch", f"the job plans {planned} {report.stage} epochs, not {report.stage_epochs}")
    elif report.stage_epochs > total:
        error("stageEpochs", "out_of_range", f"{report.stage_epochs} stage epochs of {total} planned in all")
    if report.epoch > report.stage_epochs:
        error("epoch", "out_of_range", f"epoch {report.epoch} of a stage of {report.stage_epochs} epochs")
    age = now - report.timestamp
    if age > max_age_s:
        error("timestamp", "expired", f"report made {age:.0f} s ago (at most {max_age_s:g} s)")
    elif -age > max_skew_s:
        error("timestamp", "future", f"report made {-age:.0f} s in the future (at most {max_skew_s:g} s)")
    return errors


def build_status(
    *,
    report: protocol.ProgressReport,
    total_epochs: int,
    recent_epoch_seconds: list[float],
    best_val_accuracy: float | None,
    now: float,
) -> dict[str, Any]:
    """The progress fields of `status` for one report, as the merge patch the hub writes (pure)."""
    typed = progress_status(
        report=report,
        total_epochs=total_epochs,
        recent_epoch_seconds=recent_epoch_seconds,
        best_val_accuracy=best_val_accuracy,
        now=now,
    )
    return api.status_patch(typed, writer="progress")


def progress_status(
    *,
    report: protocol.ProgressReport,
    total_epochs: int,
    recent_epoch_seconds: list[float],
    best_val_accuracy: float | None,
    now: float,
) -> api.FineTuneJobStatus:
    """The progress fields of `status` for one report, typed (pure).

    `total_epochs` is the job's plan from its spec (the report's own figure when 0);
    `progress` is the integer percent of planned epochs done, `etaSeconds` the remaining
    planned epochs times the mean of the recent epoch durations (absent until one is known,
    at most `MAX_ETA_SECONDS`). The report is one `report_errors` passed.
    The final report leaves `message` to the operator, which writes the outcome there.
    """
    total = total_epochs if total_epochs > 0 else report.total_epochs
    done = min(report.epochs_done, total) if total else 0
    progress = (100 * done) // total if total else 0
    eta: int | None = None
    if report.event == "final" and report.result == "succeeded":
        progress, eta = 100, 0
    elif total and done >= total:
        eta = 0
    elif recent := [s for s in recent_epoch_seconds if math.isfinite(s) and s >= 0]:
        mean = sum(recent) / len(recent)
        eta = min(MAX_ETA_SECONDS, math.ceil(min((total - done) * mean, float(MAX_ETA_SECONDS))))
    stage_index = protocol.STAGES.index(report.stage) + 1
    status = api.FineTuneJobStatus(
        stage=report.stage,
        epoch=report.epoch,
        epochs=f"{report.epoch}/{report.stage_epochs}",
        total_epochs=total,
        progress=progress,
        metrics={k: _short(v) for k, v in report.metrics.items() if math.isfinite(v)},
        last_progress_time=_rfc3339(now),
    )
    if report.event != "final":  # the operator's final status owns the message of a finished job
        status.message = f"phase {stage_index}/{len(protocol.STAGES)}, epoch {report.epoch}/{report.stage_epochs}"
    if eta is not None:
        status.eta_seconds = eta
    if best_val_accuracy is not None:
        status.best_val_accuracy = _short(best_val_accuracy)
    if report.images_per_second is not None:
        status.images_per_second = round(report.images_per_second, 1)
    return status


def _bearer(header: str) -> bytes | None:
    scheme, _, credential = header.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        return None
    return credential.encode()


def _cancel(job: _Job) -> None:
    if job.timer is not None:
        job.timer.cancel()
        job.timer = None


def _short(value: float) -> float:
    return float(f"{value:.4g}")


def _rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
