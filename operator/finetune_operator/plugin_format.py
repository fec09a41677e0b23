"""Pure formatting for `kubectl finetune` (the kubectl-finetune plugin): no I/O, no clock.

Everything here takes FineTuneJob, pod and event bodies as the API server returns them
(plain dicts) and returns text: the `list` table rows, the progress bar, durations, the
`watch` view (one line per change, or a rich renderable for a terminal), the final
summary, `describe`, which pod is which attempt, and the error messages made from an API
answer. `now` is passed in wherever an age is shown.

Status, event and pod fields are untrusted text (the trainer's messages travel through
them): `clean` strips control characters (terminal escapes) before anything is shown, and
rich renderables are built from `Text` objects, never from markup strings.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_contract.spec import API_GROUP, API_VERSION, JOB_LABEL, PLURAL
from rich.console import Group
from rich.table import Table
from rich.text import Text

__all__ = [
    "EXIT_API_ERROR",
    "EXIT_CONNECTION",
    "EXIT_FAILED",
    "EXIT_FORBIDDEN",
    "EXIT_NOT_FOUND",
    "EXIT_NO_CRD",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "GROUP",
    "JOB_LABEL",
    "PLURAL",
    "RESOURCE",
    "VERSION",
    "Attempt",
    "Stage",
    "api_error_message",
    "attempts",
    "bar",
    "clean",
    "describe",
    "duration",
    "final_summary",
    "list_rows",
    "parse_time",
    "render_plain_table",
    "stages",
    "watch_line",
    "watch_renderable",
]

GROUP, VERSION = API_GROUP, API_VERSION
RESOURCE = f"{PLURAL}.{GROUP}"
TRAINER_CONTAINER = "trainer"

# Exit codes (documented in the README's `kubectl finetune` section).
EXIT_OK = 0  # the command did what it was asked; `watch`: the job Succeeded
EXIT_FAILED = 1  # `watch`: the job Failed
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_TIMEOUT = 3  # `watch --timeout` ran out before the job ended
EXIT_NOT_FOUND = 4  # no such FineTuneJob (or pod, or attempt)
EXIT_NO_CRD = 5  # the FineTuneJob CRD is not installed in the cluster
EXIT_FORBIDDEN = 6  # RBAC refused the request (403) or the credentials were rejected (401)
EXIT_CONNECTION = 7  # no usable kubeconfig/context, or the API server cannot be reached
EXIT_API_ERROR = 8  # any other error answer of the API server

# C0 controls but tab and newline, DEL, C1 controls: escapes a terminal would act on.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_STAGE_DEFAULTS = {"head": 20, "fine-tune": 10}
_UNFREEZE_DEFAULT = 4
BAR_WIDTH = 20
FULL, EMPTY = "█", "░"
ASCII_FULL, ASCII_EMPTY = "#", "-"


def clean(value: Any, *, one_line: bool = True, limit: int = 1024) -> str:
    """Untrusted text -> printable text: control characters dropped, cut to `limit` characters."""
    text = "" if value is None else str(value)
    if one_line:
        text = " ".join(text.split())
    text = _CONTROL.sub("", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def duration(seconds: float | None) -> str:
    """Seconds -> `45s`, `1m35s`, `2h03m`, `3d04h`; `-` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def bar(percent: float | None, *, width: int = BAR_WIDTH, ascii_only: bool = False) -> str:
    """A text progress bar of `width` cells, e.g. `█████░░░░░░░░░░░░░░░` for 25 (clamped to 0..100)."""
    value = 0.0 if percent is None or not math.isfinite(percent) else min(100.0, max(0.0, float(percent)))
    filled = round(width * value / 100.0)
    full, empty = (ASCII_FULL, ASCII_EMPTY) if ascii_only else (FULL, EMPTY)
    return full * filled + empty * (width - filled)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any, default: int) -> int:
    number = _number(value)
    return int(number) if number is not None else default


def _status(job: Mapping[str, Any]) -> Mapping[str, Any]:
    status = job.get("status")
    return status if isinstance(status, Mapping) else {}


def _metrics(job: Mapping[str, Any]) -> dict[str, float]:
    found = _status(job).get("metrics")
    if not isinstance(found, Mapping):
        return {}
    numbers = {clean(k, limit=40): _number(v) for k, v in found.items()}
    return {k: v for k, v in numbers.items() if v is not None}


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def val_accuracy(job: Mapping[str, Any]) -> float | None:
    """The latest validation accuracy, else the best one (both from status)."""
    latest = _metrics(job).get("val_accuracy")
    return latest if latest is not None else _number(_status(job).get("bestValAccuracy"))


def _age(created: Any, now: datetime.datetime) -> str:
    moment = parse_time(created)
    return "-" if moment is None else duration((now - moment).total_seconds())


def _phase(job: Mapping[str, Any]) -> str:
    return clean(_status(job).get("phase") or "Pending", limit=20)


def _reason(job: Mapping[str, Any]) -> str:
    """status.reason, or "" when it only repeats the phase (a Succeeded job's reason is Succeeded)."""
    reason = clean(_status(job).get("reason") or "", limit=64)
    return "" if reason == _phase(job) else reason


def _epoch_text(job: Mapping[str, Any]) -> str:
    return clean(_status(job).get("epochs") or "-", limit=20)


def _progress(job: Mapping[str, Any]) -> float | None:
    return _number(_status(job).get("progress"))


def list_rows(
    jobs: Sequence[Mapping[str, Any]], *, now: datetime.datetime, all_namespaces: bool, ascii_only: bool = False
) -> list[list[str]]:
    """The `list` table: a header row, then one row per job (sorted by namespace and name)."""
    header = ["NAME", "PHASE", "STAGE", "EPOCH", "PROGRESS", "VAL-ACC", "ETA", "AGE"]
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    rows = [header]
    ordered = sorted(jobs, key=lambda j: (str(j["metadata"].get("namespace", "")), str(j["metadata"].get("name", ""))))
    for job in ordered:
        meta = job.get("metadata") or {}
        status = _status(job)
        progress = _progress(job)
        progress_text = "-" if progress is None else f"{bar(progress, width=10, ascii_only=ascii_only)} {progress:3.0f}%"
        eta = _number(status.get("etaSeconds"))
        row = [
            clean(meta.get("name"), limit=253),
            _phase(job),
            clean(status.get("stage") or "-", limit=20),
            _epoch_text(job),
            progress_text,
            _accuracy(val_accuracy(job)),
            duration(eta),
            _age(meta.get("creationTimestamp"), now),
        ]
        if all_namespaces:
            row.insert(0, clean(meta.get("namespace"), limit=63))
        rows.append(row)
    return rows


def render_plain_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows -> columns padded like `kubectl get` (three spaces apart), one line per row."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Stage:
    """One training stage as the watch view shows it: epochs done of planned."""

    name: str
    done: int
    planned: int
    state: str  # "waiting" | "running" | "done" | "skipped"

    @property
    def percent(self) -> float:
        if self.state == "done":
            return 100.0
        return 0.0 if self.planned <= 0 else min(100.0, 100.0 * self.done / self.planned)


def _planned(job: Mapping[str, Any]) -> dict[str, int]:
    training = (job.get("spec") or {}).get("training") or {}
    head = training.get("head") or {}
    fine = training.get("fineTune") or {}
    planned = {
        "head": max(0, _int(head.get("epochs"), _STAGE_DEFAULTS["head"])),
        "fine-tune": max(0, _int(fine.get("epochs"), _STAGE_DEFAULTS["fine-tune"])),
    }
    if _int(fine.get("unfreezeLast"), _UNFREEZE_DEFAULT) <= 0:
        planned["fine-tune"] = 0
    return planned


def stages(job: Mapping[str, Any]) -> list[Stage]:
    """Both stages of the job, from its spec's plan and its status (stage, epoch, phase)."""
    planned = _planned(job)
    status = _status(job)
    current = status.get("stage")
    epoch = max(0, _int(status.get("epoch"), 0))
    succeeded = status.get("phase") == "Succeeded"
    out: list[Stage] = []
    order = ["head", "fine-tune"]
    index = order.index(current) if current in order else -1
    for i, name in enumerate(order):
        if planned[name] == 0:
            out.append(Stage(name, 0, 0, "skipped"))
        elif succeeded or i < index:
            out.append(Stage(name, planned[name], planned[name], "done"))
        elif i == index:
            out.append(Stage(name, min(epoch, planned[name]), planned[name], "running"))
        else:
            out.append(Stage(name, 0, planned[name], "waiting"))
    return out


def _metric_text(metrics: Mapping[str, float], *keys: str) -> str:
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
    return " ".join(parts)


def watch_line(job: Mapping[str, Any], *, now: datetime.datetime) -> str:
    """One plain line for a job's state (what `watch` prints when stdout is not a terminal)."""
    meta = job.get("metadata") or {}
    status = _status(job)
    parts = [
        now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        f"ftj/{clean(meta.get('name'), limit=253)}",
        _phase(job),
    ]
    if reason := _reason(job):
        parts.append(f"({reason})")
    if status.get("stage"):
        parts.append(f"stage={clean(status['stage'], limit=20)}")
        parts.append(f"epoch={_epoch_text(job)}")
    progress = _progress(job)
    if progress is not None:
        parts.append(f"progress={progress:.0f}%")
    if (acc := val_accuracy(job)) is not None:
        parts.append(f"val_accuracy={_accuracy(acc)}")
    if (eta := _number(status.get("etaSeconds"))) is not None and status.get("phase") == "Running":
        parts.append(f"eta={duration(eta)}")
    if status.get("message"):
        parts.append(f"- {clean(status['message'], limit=200)}")
    return " ".join(parts)


def watch_state(job: Mapping[str, Any]) -> str:
    """What a plain-line watch compares to decide whether a change is worth a new line (no clock)."""
    status = _status(job)
    keys = ("phase", "reason", "stage", "epochs", "progress", "etaSeconds", "bestValAccuracy", "metrics", "message")
    return json.dumps({k: status.get(k) for k in keys}, sort_keys=True, default=str)


_PHASE_STYLE = {"Succeeded": "bold green", "Failed": "bold red", "Running": "bold cyan", "Suspended": "yellow"}


def watch_renderable(job: Mapping[str, Any], *, now: datetime.datetime) -> Group:
    """The live view of `watch` in a terminal: a header, one bar per stage, the latest metrics."""
    meta = job.get("metadata") or {}
    status = _status(job)
    phase = _phase(job)
    header = Text()
    header.append(f"ftj/{clean(meta.get('name'), limit=253)}", style="bold")
    header.append("  ")
    header.append(phase, style=_PHASE_STYLE.get(phase, ""))
    if reason := _reason(job):
        header.append(f" ({reason})")
    if status.get("message"):
        header.append(f"  {clean(status['message'], limit=200)}", style="dim")
    grid = Table.grid(padding=(0, 2))
    for _ in range(4):
        grid.add_column()
    for number, stage in enumerate(stages(job), start=1):
        label = f"phase {number}/2 {stage.name}"
        if stage.state == "skipped":
            grid.add_row(Text(label), Text("skipped (unfreezeLast: 0)", style="dim"), Text(""), Text(""))
            continue
        style = {"done": "green", "running": "cyan"}.get(stage.state, "dim")
        grid.add_row(
            Text(label, style="bold" if stage.state == "running" else ""),
            Text(bar(stage.percent), style=style),
            Text(f"epoch {stage.done}/{stage.planned}"),
            Text(f"{stage.percent:3.0f}%  {stage.state}"),
        )
    progress = _progress(job)
    overall = Text(f"overall {bar(progress, width=BAR_WIDTH)} {0 if progress is None else progress:3.0f}%")
    metrics = _metrics(job)
    details = Text()
    shown = _metric_text(metrics, "loss", "accuracy", "val_loss", "val_accuracy")
    details.append(shown or "no metrics yet")
    if (best := _number(status.get("bestValAccuracy"))) is not None:
        details.append(f"  best val_accuracy={best:.4g}")
    if (ips := _number(status.get("imagesPerSecond"))) is not None:
        details.append(f"  {ips:.1f} images/s")
    if (eta := _number(status.get("etaSeconds"))) is not None and phase == "Running":
        details.append(f"  ETA {duration(eta)}")
    details.append(f"  attempts {_int(status.get('attempts'), 0)}  age {_age(meta.get('creationTimestamp'), now)}")
    return Group(header, grid, overall, details)


def final_summary(job: Mapping[str, Any]) -> str:
    """What `watch` prints once the job ended: outcome, final and best metrics, timings, the model."""
    meta = job.get("metadata") or {}
    status = _status(job)
    phase = _phase(job)
    lines = [f"ftj/{clean(meta.get('name'), limit=253)} {phase}"]
    if reason := _reason(job):
        lines[0] += f": {reason}"
    if status.get("message"):
        lines.append(f"  message:          {clean(status['message'])}")
    metrics = _metrics(job)
    if metrics:
        lines.append("  final metrics:    " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    if (best := _number(status.get("bestValAccuracy"))) is not None:
        lines.append(f"  best val_accuracy: {best:.4g}")
    if (ips := _number(status.get("imagesPerSecond"))) is not None:
        lines.append(f"  images/s:         {ips:.1f}")
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    if start is not None and end is not None:
        lines.append(f"  duration:         {duration((end - start).total_seconds())}")
    lines.append(f"  attempts:         {_int(status.get('attempts'), 0)}")
    if status.get("modelPath"):
        lines.append(f"  model:            {clean(status['modelPath'])}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Attempt:
    """One trainer pod; `number` is its attempt (None: the trainer never ran in it)."""

    number: int | None
    pod: str
    phase: str
    started: str | None
    finished: str | None
    exit_code: int | None
    reason: str


def _trainer_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for found in (pod.get("status") or {}).get("containerStatuses") or []:
        if isinstance(found, Mapping) and found.get("name") == TRAINER_CONTAINER:
            return found
    return {}


def _attempt(pod: Mapping[str, Any]) -> Attempt:
    container = _trainer_status(pod)
    state = container.get("state") or {}
    terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated") or {}
    started = (state.get("running") or {}).get("startedAt") or terminated.get("startedAt")
    code = terminated.get("exitCode")
    ran = started is not None or isinstance(code, int)
    return Attempt(
        number=1 if ran else None,
        pod=clean((pod.get("metadata") or {}).get("name"), limit=253),
        phase=clean((pod.get("status") or {}).get("phase") or "Pending", limit=20),
        started=clean(started, limit=30) if started else None,
        finished=clean(terminated["finishedAt"], limit=30) if terminated.get("finishedAt") else None,
        exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        reason=clean(terminated.get("reason") or (state.get("waiting") or {}).get("reason") or "", limit=64),
    )


def attempts(pods: Sequence[Mapping[str, Any]], *, counted: int) -> list[Attempt]:
    """The job's pods as attempts, oldest first.

    Pods go away (suspend deletes them), so the numbers count back from the newest pod in
    which the trainer ran: that one is attempt `counted` (status.attempts), or the number of
    pods that ran when that is more. A pod in which the trainer never ran has no number.
    """
    ordered = sorted(
        pods,
        key=lambda p: (str((p.get("metadata") or {}).get("creationTimestamp") or ""), str((p.get("metadata") or {}).get("name"))),
    )
    found = [_attempt(pod) for pod in ordered]
    number = max(counted, sum(1 for a in found if a.number is not None))
    out: list[Attempt] = []
    for attempt in reversed(found):
        if attempt.number is not None:
            attempt = Attempt(**{**attempt.__dict__, "number": number})
            number -= 1
        out.append(attempt)
    return out[::-1]


def _condition_lines(status: Mapping[str, Any]) -> list[str]:
    rows = [["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]]
    for cond in status.get("conditions") or []:
        if not isinstance(cond, Mapping):
            continue
        rows.append(
            [
                clean(cond.get("type"), limit=40),
                clean(cond.get("status"), limit=10),
                clean(cond.get("reason") or "-", limit=64),
                clean(cond.get("lastTransitionTime") or "-", limit=30),
                clean(cond.get("message") or "", limit=300),
            ]
        )
    if len(rows) == 1:
        return ["  (none)"]
    return ["  " + line for line in render_plain_table(rows).splitlines()]


def describe(
    job: Mapping[str, Any],
    *,
    pods: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    now: datetime.datetime,
) -> str:
    """`describe NAME`: what the job is, where it stands, why, its attempts, its events, its model."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    status = _status(job)
    model = spec.get("model") or {}
    lines = [
        f"Name:          {clean(meta.get('name'), limit=253)}",
        f"Namespace:     {clean(meta.get('namespace'), limit=63)}",
        f"Created:       {clean(meta.get('creationTimestamp') or '-', limit=30)} ({_age(meta.get('creationTimestamp'), now)} ago)",
        f"Model:         {clean(model.get('base') or '-', limit=80)} (weights: {clean(model.get('weights') or '-', limit=200)})",
        f"Suspend:       {bool(spec.get('suspend'))}",
        f"Phase:         {_phase(job)}" + (f" ({reason})" if (reason := _reason(job)) else ""),
    ]
    if status.get("message"):
        lines.append(f"Message:       {clean(status['message'])}")
    failed = next(
        (c for c in status.get("conditions") or [] if isinstance(c, Mapping) and c.get("type") == "Failed" and c.get("status") == "True"),
        None,
    )
    if failed is not None:
        lines.append(f"Failure:       {clean(failed.get('reason') or status.get('reason') or '-', limit=64)}")
        if failed.get("message"):
            lines.append(f"  Trainer says: {clean(failed.get('message'))}")
    progress = _progress(job)
    stage_text = ", ".join(
        f"{s.name} {s.done}/{s.planned}" + ("" if s.state in ("running", "done") else f" ({s.state})") for s in stages(job)
    )
    lines += [
        f"Stages:        {stage_text}",
        f"Progress:      {'-' if progress is None else f'{progress:.0f}%'}"
        + (f", ETA {duration(eta)}" if (eta := _number(status.get("etaSeconds"))) is not None and _phase(job) == "Running" else ""),
    ]
    metrics = _metrics(job)
    if metrics:
        lines.append("Metrics:       " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    if (best := _number(status.get("bestValAccuracy"))) is not None:
        lines.append(f"Best val acc:  {best:.4g}")
    if (ips := _number(status.get("imagesPerSecond"))) is not None:
        lines.append(f"Images/s:      {ips:.1f}")
    for key, label in (("startTime", "Started"), ("completionTime", "Completed"), ("lastProgressTime", "Last report")):
        if status.get(key):
            lines.append(f"{label + ':':<15}{clean(status[key], limit=30)}")
    output = (spec.get("output") or {}).get("path")
    lines.append(f"Output:        {clean(output or '-', limit=500)}")
    lines.append(
        f"Model path:    {clean(status['modelPath'], limit=500)}" if status.get("modelPath") else "Model path:    (not saved yet)"
    )
    lines.append("Conditions:")
    lines += _condition_lines(status)
    lines.append(f"Attempts:      {_int(status.get('attempts'), 0)}")
    found = attempts(pods, counted=_int(status.get("attempts"), 0))
    if found:
        rows = [["#", "POD", "PHASE", "STARTED", "FINISHED", "EXIT", "REASON"]]
        for a in found:
            rows.append(
                [
                    "-" if a.number is None else str(a.number),
                    a.pod,
                    a.phase,
                    a.started or "-",
                    a.finished or "-",
                    "-" if a.exit_code is None else str(a.exit_code),
                    a.reason or "-",
                ]
            )
        lines += ["  " + line for line in render_plain_table(rows).splitlines()]
    else:
        lines.append("  (no trainer pods now)")
    lines.append("Events:")
    lines += _event_lines(events, now=now)
    return "\n".join(lines) + "\n"


def _event_time(event: Mapping[str, Any]) -> str:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        if event.get(key):
            return str(event[key])
    return str((event.get("metadata") or {}).get("creationTimestamp") or "")


def _event_lines(events: Sequence[Mapping[str, Any]], *, now: datetime.datetime) -> list[str]:
    if not events:
        return ["  (none)"]
    rows = [["TYPE", "REASON", "AGE", "FROM", "MESSAGE"]]
    for event in sorted(events, key=_event_time):
        source = event.get("source") or {}
        rows.append(
            [
                clean(event.get("type") or "-", limit=20),
                clean(event.get("reason") or "-", limit=64),
                _age(_event_time(event), now),
                clean(source.get("component") or event.get("reportingComponent") or "-", limit=60),
                clean(event.get("message") or "", limit=300),
            ]
        )
    return ["  " + line for line in render_plain_table(rows).splitlines()]


def api_error_message(
    *,
    status: int,
    body: str,
    verb: str,
    resource: str,
    namespace: str | None,
    name: str | None = None,
) -> tuple[int, str]:
    """(exit code, message) for an error answer of the API server to `verb resource[/name]` in `namespace`.

    A 404 here means the named object is missing (the caller tells a missing CRD apart, by
    discovery, before it gets here). The server's own message follows ours, cleaned.
    """
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {}
    server = clean(parsed.get("message") if isinstance(parsed, dict) else "", limit=500) or clean(body, limit=300)
    where = f" in namespace {namespace}" if namespace else " at the cluster scope"
    if status == 403:
        return EXIT_FORBIDDEN, f"forbidden: cannot {verb} {resource}{where}" + (f" ({server})" if server else "")
    if status == 401:
        return EXIT_FORBIDDEN, "unauthorized: the API server rejected the credentials of this kubeconfig (HTTP 401)"
    if status == 404:
        what = "finetunejob" if resource == RESOURCE else resource
        target = f'{what} "{name}"' if name else what
        return EXIT_NOT_FOUND, f"{target} not found{where}"
    return EXIT_API_ERROR, f"{verb} {resource}{where} failed: HTTP {status}" + (f": {server}" if server else "")
