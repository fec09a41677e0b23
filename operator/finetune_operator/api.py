"""Typed models of the FineTuneJob resource: the single source of truth for its spec and status.

The training part of the spec is the contract's `finetune_contract.spec.TrainerSpec`, the model
the trainer validates its config with (reused, never duplicated); this module adds what only
Kubernetes needs (`runtime`, `suspend`) and the status the operator and its progress hub write. `crd.py` renders the
CRD's OpenAPI schema from these models, so descriptions, defaults, ranges and enums live here.

Kubernetes-native sub-objects (resources, volumes, env, affinity, ...) are plain dicts here,
marked with the Kubernetes type they are (`KUBERNETES_TYPE`): `crd.py` puts that type's own
OpenAPI schema into the CRD, bounded, so admission checks them like a Pod's fields and names
an unknown or wrong one, and whatever it admits fits in the batch Job the operator creates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from finetune_contract import protocol
from finetune_contract.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SpecModel,
    TrainerSpec,
    format_validation_error,
)
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo

from finetune_operator.models import KERAS_APPLICATIONS

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CONDITION_TYPES",
    "IMMUTABLE_SPEC_RULE",
    "KIND",
    "KUBERNETES_TYPE",
    "MAX_NAME_LENGTH",
    "NAME_LENGTH_RULE",
    "OBJECT_RULES",
    "PHASES",
    "PLURAL",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Phase",
    "PrinterColumn",
    "RuntimeSpec",
    "Stage",
    "WorkersStatus",
    "Writer",
    "WrittenBy",
    "operator_refusal",
    "shared_status_fields",
    "status_fields",
    "status_patch",
]

SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("finetune",)

Stage = protocol.Stage  # head (phase 1) or fine-tune (phase 2), as the trainer reports it
Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[Phase, ...] = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
ConditionType = Literal["Ready", "Running", "Complete", "Failed", "Suspended", "Reconciling", "Stalled"]
# Reconciling and Stalled are kstatus' "abnormal-true" pair (sigs.k8s.io/cli-utils): True while
# the job is still on its way (Pending, Running) and when it failed for good, respectively.
CONDITION_TYPES: tuple[ConditionType, ...] = (
    "Ready",
    "Running",
    "Complete",
    "Failed",
    "Suspended",
    "Reconciling",
    "Stalled",
)

# A Kubernetes object of the named OpenAPI type (io.k8s.api.core.v1.<Kind>): `crd.py` replaces
# this marker with the type's schema; pydantic keeps it as a dict (admission has checked it).
KUBERNETES_TYPE = "x-finetune-kubernetes-type"


def _kubernetes(kind: str) -> Any:
    return Field(json_schema_extra={KUBERNETES_TYPE: f"io.k8s.api.core.v1.{kind}"})


# Label keys and values as Kubernetes validates them (apimachinery's qualified name and label value).
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
DNS_SUBDOMAIN_OR_EMPTY_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"
IMAGE_PATTERN = r"^[!#-\[\]-~]*$"  # printable ASCII, no spaces, quotes or backslashes
LabelKey = Annotated[str, Field(max_length=317, pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]

MAX_ENV_VALUES = 6144  # characters of all runtime.env values together (each may have 4096)


def total_length_rule(*, field: str, total: int) -> dict[str, JsonValue]:
    """The CEL rule "the FIELD strings of a list's items total at most TOTAL characters"."""
    return {
        "rule": f"self.map(x, has(x.{field}) ? size(x.{field}) : 0).sum() <= {total}",
        "message": f"the {field}s must total at most {total} characters",
    }


Resources = Annotated[dict[str, Any], _kubernetes("ResourceRequirements")]
Affinity = Annotated[dict[str, Any], _kubernetes("Affinity")]
Volume = Annotated[dict[str, Any], _kubernetes("Volume")]
VolumeMount = Annotated[dict[str, Any], _kubernetes("VolumeMount")]
EnvVar = Annotated[dict[str, Any], _kubernetes("EnvVar")]
Toleration = Annotated[dict[str, Any], _kubernetes("Toleration")]


class RuntimeSpec(SpecModel):
    """How the job runs on Kubernetes; a local `finetune-train` run ignores all of it."""

    image: str = Field(
        default="",
        max_length=512,
        pattern=IMAGE_PATTERN,
        description="Trainer container image; empty means the operator's default (--trainer-image).",
    )
    gpus: int = Field(
        default=1,
        ge=0,
        le=64,
        description="nvidia.com/gpu per worker, merged into resources.limits; 0 trains on the CPU.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Number of workers (pods). Above 1: multi-worker training (MultiWorkerMirroredStrategy) in a "
            "JobSet, restarted as a group; output.path must be on a ReadWriteMany PersistentVolumeClaim."
        ),
    )
    resources: Resources = Field(
        default_factory=dict,
        description="Container resources (requests and limits, as in a Pod); the GPU limit is merged in.",
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=8,
        description="Pod volumes, as in a PodSpec (e.g. PVCs holding the data and the models).",
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=16,
        description="Volume mounts of the trainer container, as in a Container.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-validations": [total_length_rule(field="value", total=MAX_ENV_VALUES)]},
        description="Extra environment variables of the trainer container, as in a Container.",
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=8,
        description="Node labels the pod must match, as in a PodSpec.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=8,
        description="Pod tolerations, as in a PodSpec (e.g. for tainted GPU nodes).",
    )
    affinity: Affinity = Field(
        default_factory=dict,
        description="Pod affinity and anti-affinity, as in a PodSpec.",
    )
    priority_class_name: str = Field(
        default="",
        max_length=253,
        pattern=DNS_SUBDOMAIN_OR_EMPTY_PATTERN,
        description="PriorityClass of the pod; empty means the cluster default.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description=(
            "Retries of retryable failures (unexpected errors, lost nodes, OOM); invalid spec, data "
            "errors and divergence never retry, and preemption never counts."
        ),
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Wall-clock limit of the whole job in seconds; past it the job fails with DeadlineExceeded.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Seconds after the job finishes before its batch Job and pods are deleted.",
    )


class FineTuneJobSpec(TrainerSpec):
    """What to train (the trainer's spec), how to run it on Kubernetes, and whether it is suspended."""

    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec,
        description="Kubernetes-only settings: image, GPUs, volumes, scheduling, retries, deadlines.",
    )
    suspend: bool = Field(
        default=False,
        description="true suspends the job (its pod is deleted, training resumes from checkpoints on false).",
    )


Writer = Literal["operator", "progress"]


@dataclass(frozen=True)
class WrittenBy:
    """Metadata of a status field: who writes it, the reconciler ("operator"), the progress hub, or both.

    `status_fields` derives each writer's field list from it; `status_patch` refuses a field
    its writer does not own.
    """

    writers: tuple[Writer, ...]


@dataclass(frozen=True)
class PrinterColumn:
    """Metadata of a field: a column of `kubectl get` (the CRD's additionalPrinterColumns).

    `crd.py` renders one column per marked field, in `order`, with the field's JSON path
    (`.status.<field>`, or `.<field>.<path>` on `FineTuneJob`).
    """

    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    order: int
    description: str | None = None
    priority: int = 0  # 1: only with `kubectl get -o wide`
    path: str | None = None  # below the field, e.g. creationTimestamp of metadata


_OPERATOR = WrittenBy(("operator",))
_PROGRESS = WrittenBy(("progress",))
_BOTH = WrittenBy(("operator", "progress"))  # the hub's while training, the operator's at the end


class _StatusModel(BaseModel):
    # Forbid: a misspelt or unknown status field is a ValidationError here (and a mypy error
    # where the model is constructed), not a key the API server silently prunes; a value set
    # after construction is validated too.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_assignment=True
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_StatusModel):
    """A condition in the metav1.Condition shape."""

    type: ConditionType = Field(
        description=(
            "Ready, Running, Complete, Failed, Suspended, Reconciling (kstatus: in progress) "
            "or Stalled (kstatus: failed)."
        )
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the condition was set from."
    )
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"}, description="When the status last changed."
    )
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="A CamelCase reason for the last transition.",
    )
    message: str = Field(default="", max_length=32768, description="A human-readable explanation.")


class WorkersStatus(_StatusModel):
    """The workers of a multi-worker job (runtime.workers > 1): how many of its pods are ready."""

    ready: int = Field(ge=0, description="Worker pods of the current attempt whose trainer is running and Ready.")
    total: int = Field(ge=1, description="Workers of the job (spec.runtime.workers).")


class FineTuneJobStatus(_StatusModel):
    """What the job is doing: phase, conditions, progress of the training and where the model is."""

    observed_generation: Annotated[int | None, _OPERATOR] = Field(
        default=None, description="The metadata.generation this status describes."
    )
    phase: Annotated[Phase | None, _OPERATOR, PrinterColumn("Phase", "string", 1, "Phase of the job.")] = Field(
        default=None, description="Pending, Running, Suspended, Succeeded or Failed."
    )
    reason: Annotated[str | None, _OPERATOR, PrinterColumn("Reason", "string", 7, "Why.", priority=1)] = Field(
        default=None,
        description="Why the job is in its phase, CamelCase (e.g. DataError, BackoffLimitExceeded on Failed).",
    )
    stage: Annotated[Stage | None, _PROGRESS, PrinterColumn("Stage", "string", 2, "Training stage now running.")] = Field(
        default=None, description="The training phase now running: head (phase 1) or fine-tune (phase 2)."
    )
    epoch: Annotated[int | None, _PROGRESS] = Field(
        default=None, ge=0, description="Epochs completed within the current stage."
    )
    epochs: Annotated[str | None, _PROGRESS, PrinterColumn("Epoch", "string", 3, "Epoch within the stage.")] = Field(
        default=None,
        description="Epoch within the stage over the stage's planned epochs, e.g. 4/10 (the EPOCH column).",
    )
    total_epochs: Annotated[int | None, _PROGRESS] = Field(
        default=None, ge=0, description="Planned epochs of both stages."
    )
    progress: Annotated[
        int | None, _BOTH, PrinterColumn("Progress", "integer", 4, "Percent of planned epochs done.")
    ] = Field(
        default=None, ge=0, le=100, description="Percent of the planned epochs done; early stopping jumps it."
    )
    eta_seconds: Annotated[int | None, _BOTH, PrinterColumn("ETA", "integer", 6, "Seconds left.")] = Field(
        default=None, ge=0, description="Estimated seconds until training ends."
    )
    metrics: Annotated[dict[str, float] | None, _PROGRESS] = Field(
        default=None, description="Latest epoch metrics: loss, accuracy, val_loss, val_accuracy."
    )
    best_val_accuracy: Annotated[
        float | None, _PROGRESS, PrinterColumn("Val-Acc", "number", 5, "Best validation accuracy.")
    ] = Field(
        default=None, description="Best validation accuracy so far."
    )
    images_per_second: Annotated[float | None, _PROGRESS] = Field(
        default=None, ge=0, description="Training throughput of the last epoch."
    )
    attempts: Annotated[int | None, _OPERATOR] = Field(
        default=None,
        ge=0,
        description="Pods started so far (retries and resumes); of a multi-worker job, starts of its worker group.",
    )
    workers: Annotated[WorkersStatus | None, _OPERATOR] = Field(
        default=None, description="Ready and total workers of a multi-worker job (runtime.workers > 1)."
    )
    start_time: Annotated[str | None, _OPERATOR] = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When the first pod started."
    )
    completion_time: Annotated[str | None, _OPERATOR] = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When the job succeeded or failed."
    )
    last_progress_time: Annotated[str | None, _PROGRESS] = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When the last progress report arrived."
    )
    model_path: Annotated[str | None, _OPERATOR] = Field(
        default=None, description="The saved model (model.keras) once trained."
    )
    message: Annotated[str | None, _BOTH] = Field(default=None, description="A human-readable summary of the state.")
    conditions: Annotated[list[Condition] | None, _OPERATOR] = Field(
        default=None,
        description=(
            "Ready, Running, Complete, Failed, Suspended, and kstatus' Reconciling (True while Pending or "
            "Running) and Stalled (True when Failed), in the metav1.Condition shape."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def _writers(field: FieldInfo) -> tuple[Writer, ...]:
    for meta in field.metadata:
        if isinstance(meta, WrittenBy):
            return meta.writers
    raise TypeError(f"status field {field.alias} says not who writes it (api.WrittenBy)")


def status_fields(*, writer: Writer, only: bool = False) -> tuple[str, ...]:
    """The JSON names of the status fields `writer` writes, in the model's order.

    `only`: just the fields no one else writes. The fields both write (`shared_status_fields`)
    are the hub's while the job trains and the operator's once it has finished.
    """
    return tuple(
        field.alias or name
        for name, field in FineTuneJobStatus.model_fields.items()
        if writer in _writers(field) and not (only and len(_writers(field)) > 1)
    )


def shared_status_fields() -> tuple[str, ...]:
    """The JSON names of the status fields both the operator and the progress hub write."""
    return tuple(
        field.alias or name
        for name, field in FineTuneJobStatus.model_fields.items()
        if set(_writers(field)) == {"operator", "progress"}
    )


def status_patch(
    status: FineTuneJobStatus, *, writer: Writer, exclude: Collection[str] = ()
) -> dict[str, JsonValue]:
    """`status` as a JSON merge patch of the status subresource, as `writer` may write it.

    The fields that were set go in, by their JSON names (camelCase), and only those: a field
    set to None is null in the patch and so clears the field on the server (merge-patch
    semantics); a field left at its default is left out. A field that `writer` does not write
    (`WrittenBy`) is a ValueError. `exclude`: JSON names to leave out.
    """
    fields = FineTuneJobStatus.model_fields
    foreign = sorted(name for name in status.model_fields_set if writer not in _writers(fields[name]))
    if foreign:
        raise ValueError(f"status field(s) {', '.join(foreign)} are not written by the {writer} (api.WrittenBy)")
    dumped = status.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return {key: value for key, value in dumped.items() if key not in exclude}


MAX_NAME_LENGTH = 52  # Job names become pod labels (63) and pod names get a 6-char suffix and more.

# The CEL rules of the whole object (x-kubernetes-validations of FineTuneJob).
NAME_LENGTH_RULE: dict[str, JsonValue] = {
    "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
    "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (it names the batch Job and its pods)",
}
IMMUTABLE_SPEC_RULE: dict[str, JsonValue] = {
    # From creation on: the operator hands the spec to the Job at once, so a later edit would
    # leave the FineTuneJob describing a training that is not the one running.
    "rule": (
        "self.spec.model == oldSelf.spec.model && self.spec.data == oldSelf.spec.data && "
        "self.spec.training == oldSelf.spec.training && self.spec.output == oldSelf.spec.output && "
        "self.spec.runtime == oldSelf.spec.runtime"
    ),
    "message": "spec is immutable once the job is created, except spec.suspend",
    "fieldPath": ".spec",
    "reason": "FieldValueForbidden",
}
OBJECT_RULES: tuple[dict[str, JsonValue], ...] = (NAME_LENGTH_RULE, IMMUTABLE_SPEC_RULE)


class FineTuneJob(BaseModel):
    """A two-phase fine-tuning of a pretrained Keras image model, run as a batch Job."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        json_schema_extra={"x-kubernetes-validations": list(OBJECT_RULES)},
    )

    api_version: str = Field(
        default=f"{API_GROUP}/{API_VERSION}", description="APIVersion of the object: finetune.dev/v1alpha1."
    )
    kind: str = Field(default=KIND, description="Kind of the object: FineTuneJob.")
    metadata: Annotated[
        dict[str, Any], PrinterColumn("Age", "date", 8, path="creationTimestamp")
    ] = Field(default_factory=dict, description="The object's metadata (metav1.ObjectMeta).")
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = Field(default_factory=FineTuneJobStatus)


def operator_refusal(*, name: str, spec: Mapping[str, Any]) -> tuple[FineTuneJobSpec | None, str | None]:
    """The parsed spec, or why the operator refuses it (what admission could not know)."""
    if len(name) > MAX_NAME_LENGTH:
        return None, f"metadata.name: at most {MAX_NAME_LENGTH} characters (it names the Job and its pods)"
    try:
        parsed = FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as exc:
        return None, format_validation_error(exc)
    if parsed.model.base not in KERAS_APPLICATIONS:
        return None, (
            f"spec.model.base: unknown keras.applications model {parsed.model.base!r} "
            f"(known: {', '.join(sorted(KERAS_APPLICATIONS)[:6])}, ...)"
        )
    if parsed.runtime.workers > 1:
        from finetune_operator.builders import jobset_name_refusal  # builders imports this module

        too_long = jobset_name_refusal(name=name, workers=parsed.runtime.workers)
        if too_long is not None:
            return None, too_long
    return parsed, None
