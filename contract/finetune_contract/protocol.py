"""The wire contract between a trainer pod and the operator's progress endpoint.

Both sides import this module (the contract package): the trainer builds `ProgressReport`s and POSTs them as JSON
(camelCase keys) to `{FINETUNE_PROGRESS_URL}` with the header
`Authorization: Bearer <token>`; the operator validates the body with the same model.

In a pod the token is a projected ServiceAccount token bound to the pod, with an audience
unique to the job (`progress_audience(uid)`), read from `$FINETUNE_PROGRESS_TOKEN_FILE` at
every report (the kubelet rotates it). The operator checks it with a TokenReview and against
the pod's owning job; the Kubernetes API itself refuses it (wrong audience). Outside a
cluster a fixed token may come from `$FINETUNE_PROGRESS_TOKEN` instead.

No TensorFlow, Keras, Kopf or Kubernetes imports here: it must stay cheap for both sides.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = [
    "ENV_JOB_NAME",
    "ENV_JOB_NAMESPACE",
    "ENV_JOB_UID",
    "ENV_METRICS_PORT",
    "ENV_PROGRESS_TOKEN",
    "ENV_PROGRESS_TOKEN_FILE",
    "ENV_PROGRESS_URL",
    "ENV_WORKER_HOSTS",
    "ENV_WORKER_INDEX",
    "MAX_EPOCHS",
    "MAX_EPOCH_SECONDS",
    "MAX_METRICS",
    "MAX_METRIC_MAGNITUDE",
    "MAX_REPORT_BYTES",
    "MAX_TIMESTAMP",
    "PROGRESS_AUDIENCE_PREFIX",
    "PROGRESS_PATH",
    "STAGES",
    "TERMINATION_MESSAGE_MAX_BYTES",
    "ProgressReport",
    "Stage",
    "TerminationSummary",
    "progress_audience",
]

# Environment the operator gives each trainer container.
ENV_PROGRESS_URL = "FINETUNE_PROGRESS_URL"  # e.g. http://finetune-operator.finetune-system.svc:8081/v1/progress
ENV_PROGRESS_TOKEN_FILE = "FINETUNE_PROGRESS_TOKEN_FILE"  # the projected token's path, re-read per report
ENV_PROGRESS_TOKEN = "FINETUNE_PROGRESS_TOKEN"  # a fixed token instead (local runs, tests)
ENV_JOB_NAMESPACE = "FINETUNE_JOB_NAMESPACE"
ENV_JOB_NAME = "FINETUNE_JOB_NAME"
ENV_JOB_UID = "FINETUNE_JOB_UID"
ENV_METRICS_PORT = "FINETUNE_METRICS_PORT"  # the trainer's own /metrics; 0 or unset: not served
# Multi-worker training (runtime.workers > 1, finetune_trainer.distribute):
ENV_WORKER_INDEX = "FINETUNE_WORKER_INDEX"  # this worker's index, 0 = the chief
ENV_WORKER_HOSTS = "FINETUNE_WORKER_HOSTS"  # host:port of every worker, comma-separated, index order

PROGRESS_PATH = "/v1/progress"
PROGRESS_AUDIENCE_PREFIX = "progress.finetune.dev/"
MAX_REPORT_BYTES = 64 * 1024
TERMINATION_MESSAGE_MAX_BYTES = 4096

# Bounds of a progress report's numbers (generous for real runs, small enough that no status
# write built from them can fail: every integer fits an int32, every float is a sane magnitude).
MAX_EPOCHS = 1_000_000  # of a stage and of both
MAX_METRICS = 32
MAX_METRIC_MAGNITUDE = 1e15  # |loss| beyond this is a diverged run, not a number to show
MAX_IMAGES_PER_SECOND = 1e9
MAX_EPOCH_SECONDS = 366 * 86400.0
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01T00:00:00Z

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_METRIC_NAME = r"^[A-Za-z_][A-Za-z0-9_./-]{0,63}$"  # printable, as Keras names them

Stage = Literal["head", "fine-tune"]
STAGES: tuple[Stage, ...] = ("head", "fine-tune")

Event = Literal["stage-start", "epoch-end", "heartbeat", "stage-end", "final"]


_Epochs = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
_Metric = Annotated[float, Field(ge=-MAX_METRIC_MAGNITUDE, le=MAX_METRIC_MAGNITUDE)]


def progress_audience(uid: str) -> str:
    """The audience of a job's progress token: unique to the FineTuneJob (its uid)."""
    return f"{PROGRESS_AUDIENCE_PREFIX}{uid}"


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ProgressReport(_Wire):
    """One progress report from a trainer to the operator.

    Untrusted on the operator's side, so every field is bounded here: numbers are finite
    (`allow_inf_nan=False`: no NaN or infinity, which would disable the stale-report check or
    break a status write) and in range, strings are short and names are Kubernetes names. The
    operator validates the JSON strictly (`strict=True`: no "5" for 5, no 5.0 for an epoch) and
    then checks what only it knows: the epochs against the job's plan, the timestamp against
    its clock (`progress.report_errors`).
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, allow_inf_nan=False
    )

    namespace: str = Field(
        min_length=1, max_length=63, pattern=_DNS_LABEL, description="The FineTuneJob's namespace."
    )
    name: str = Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN, description="The FineTuneJob's name.")
    uid: str = Field(
        default="", max_length=64, pattern=r"^[A-Za-z0-9-]*$", description="The FineTuneJob's uid, when known."
    )
    event: Event = Field(description="What happened: a stage started or ended, an epoch ended, a heartbeat, the end.")
    stage: Stage = Field(description="The training phase: head (phase 1) or fine-tune (phase 2).")
    epoch: _Epochs = Field(description="Epochs completed within the stage.")
    stage_epochs: _Epochs = Field(description="Planned epochs of this stage.")
    epochs_done: _Epochs = Field(
        description="Planned epochs done over both stages; an early-stopped stage counts in full."
    )
    total_epochs: _Epochs = Field(description="Planned epochs of both stages.")
    metrics: dict[Annotated[str, Field(pattern=_METRIC_NAME)], _Metric] = Field(
        default_factory=dict,
        max_length=MAX_METRICS,
        description="Latest epoch metrics: loss, accuracy, val_loss, val_accuracy.",
    )
    best_val_accuracy: _Metric | None = Field(default=None, description="Best val_accuracy so far, both stages.")
    images_per_second: float | None = Field(
        default=None, ge=0.0, le=MAX_IMAGES_PER_SECOND, description="Training throughput of the last epoch."
    )
    epoch_seconds: float | None = Field(
        default=None, ge=0.0, le=MAX_EPOCH_SECONDS, description="Wall seconds of the last epoch."
    )
    timestamp: float = Field(ge=0.0, le=MAX_TIMESTAMP, description="Unix time the report was made, in seconds.")
    result: Literal["succeeded", "failed"] | None = Field(default=None, description="Set on the final report.")
    message: str = Field(default="", max_length=1024, description="A short human-readable note.")


class TerminationSummary(_Wire):
    """What the trainer writes to the termination-message path on exit (at most 4 KiB of JSON)."""

    exit_code: int
    reason: str = Field(description="Succeeded, InvalidSpec, DataError, Diverged or Error.")
    message: str
    metrics: dict[str, float] = Field(default_factory=dict)
    model_path: str | None = None
