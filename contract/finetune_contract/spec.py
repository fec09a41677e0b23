"""The FineTuneJob's API group, version and kind, and typed models of its spec's training fields.

These pydantic models are the single source of truth for those fields: the trainer validates
its config file with them (`finetune_trainer.config`), and the operator extends `TrainerSpec`
with what only Kubernetes needs (`finetune_operator.api`) and renders the CRD's OpenAPI schema
from it (descriptions, defaults, ranges, enums and CEL rules all come from here).

Only pydantic here: no TensorFlow, Keras, Kopf or Kubernetes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from typing_extensions import TypedDict

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "JOB_LABEL",
    "KIND",
    "MAX_STAGE_EPOCHS",
    "PATH_PATTERN",
    "PLURAL",
    "AugmentationSpec",
    "BaseOptions",
    "DataSpec",
    "EarlyStoppingSpec",
    "FineTunePhaseSpec",
    "HeadPhaseSpec",
    "HeadSpec",
    "LearningRate",
    "ModelSpec",
    "OutputSpec",
    "ReduceLROnPlateauSpec",
    "SpecModel",
    "TrainerSpec",
    "TrainingSpec",
    "format_validation_error",
]

API_GROUP = "finetune.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
JOB_LABEL = f"{API_GROUP}/job"  # on the Jobs, JobSets and pods made for a FineTuneJob: its name

MAX_PATH_LENGTH = 1024  # folders and files: data, output, weights
PATH_PATTERN = r"^[^\x00-\x1f\x7f]*$"  # no control characters
MAX_STAGE_EPOCHS = 100_000  # of one phase: both together stay within the progress protocol's bound

LearningRate = Annotated[float, Field(gt=0.0, lt=1.0)]
# A folder or file path (data, output, weights): not empty, bounded, no control characters.
PathText = Annotated[str, Field(min_length=1, max_length=MAX_PATH_LENGTH, pattern=PATH_PATTERN)]


class SpecModel(BaseModel):
    """Base of every spec model: camelCase names as users type them, unknown keys refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class HeadSpec(SpecModel):
    """The new classification head put on top of the pretrained base."""

    units: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        default_factory=lambda: [256],
        description="Sizes of the Dense(relu) layers after GlobalAveragePooling2D, in order.",
    )
    dropout: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="Dropout rate before the softmax layer (0 <= dropout < 1).",
    )


class BaseOptions(TypedDict, total=False):
    """Keyword arguments of a keras.applications constructor beyond the ones the trainer sets.

    A closed set, named as Keras names them: a map of free keys could not bound the length
    of its keys at admission (a structural schema types each value, and values that may be a
    number, a string or a bool are invisible to CEL), so every key is listed with its type.
    The trainer sets include_top, weights, input_shape and input_tensor itself; classes and
    classifier_activation only matter with the top it leaves out.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    alpha: Annotated[
        float, Field(gt=0.0, le=4.0, description="Width multiplier of MobileNet, MobileNetV2 and MobileNetV3.")
    ]
    depth_multiplier: Annotated[int, Field(ge=1, le=16, description="Depth multiplier of MobileNet.")]
    dropout: Annotated[float, Field(ge=0.0, lt=1.0, description="Dropout rate of MobileNet.")]
    dropout_rate: Annotated[float, Field(ge=0.0, lt=1.0, description="Dropout rate of MobileNetV3.")]
    minimalistic: Annotated[bool, Field(description="MobileNetV3's minimalistic variant (no SE blocks, no hard-swish).")]
    include_preprocessing: Annotated[
        bool,
        Field(description="Whether the base rescales its input itself (MobileNetV3, EfficientNetV2, ConvNeXt)."),
    ]
    pooling: Annotated[Literal["avg", "max"], Field(description="Global pooling of the base's output: avg or max.")]
    name: Annotated[
        str,
        Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$", description="Name of the base model."),
    ]


class ModelSpec(SpecModel):
    """The pretrained base model and the head trained on top of it."""

    base: str = Field(
        default="VGG16",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
        description=(
            "Name of a keras.applications model class: VGG16, ResNet50, MobileNetV2, "
            "EfficientNetB0, ... An unknown name fails the job with reason InvalidSpec."
        ),
    )
    weights: PathText = Field(
        default="imagenet",
        description=(
            "Pretrained weights of the base: 'imagenet', 'none' (random initialisation) or the "
            "path of a weights file for the base without its top (include_top=False)."
        ),
    )
    # Bounded so that what admission takes can be built (one bound: the CRD has one item schema).
    input_shape: tuple[
        Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)]
    ] = Field(
        default=(224, 224, 3),
        description="Input image shape [height, width, channels]; images are resized to it.",
    )
    base_options: BaseOptions = Field(
        default_factory=lambda: BaseOptions(),
        description=(
            "Extra keyword arguments of the base model's constructor, named as in Keras: alpha, "
            "depth_multiplier, dropout, dropout_rate, minimalistic, include_preprocessing, pooling, name."
        ),
    )
    head: HeadSpec = Field(default_factory=HeadSpec, description="The classification head.")


class AugmentationSpec(SpecModel):
    """Random augmentation of the training split (never of validation)."""

    enabled: bool = Field(default=True, description="Whether to augment the training images.")
    rotation: float = Field(default=20.0, ge=0.0, le=180.0, description="Maximum rotation, in degrees.")
    zoom: float = Field(default=0.2, ge=0.0, lt=1.0, description="Maximum zoom in or out, as a fraction.")
    width_shift: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Maximum horizontal shift, as a fraction of the width."
    )
    height_shift: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Maximum vertical shift, as a fraction of the height."
    )
    horizontal_flip: bool = Field(default=True, description="Whether to flip images left-right at random.")


class DataSpec(SpecModel):
    """Where the images are: one sub-folder per class (the flow_from_directory layout)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.validation) != has(self.validationSplit)",
                    "message": "exactly one of data.validation and data.validationSplit must be set",
                }
            ]
        }
    )

    train: PathText = Field(
        description="Folder of training images, one sub-folder per class.",
    )
    validation: PathText | None = Field(
        default=None,
        description="Folder of validation images with the same class sub-folders. Exclusive with validationSplit.",
    )
    validation_split: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Fraction of the training images held out for validation. Exclusive with validation.",
    )
    augmentation: AugmentationSpec = Field(
        default_factory=AugmentationSpec,
        description="Augmentation of the training split; omitted means the defaults, enabled.",
    )

    @model_validator(mode="after")
    def _exactly_one_validation_source(self) -> DataSpec:
        if (self.validation is None) == (self.validation_split is None):
            raise ValueError("exactly one of data.validation and data.validationSplit must be set")
        return self


class HeadPhaseSpec(SpecModel):
    """Phase 1: the base frozen, only the new head trains."""

    epochs: int = Field(
        default=20, ge=0, le=MAX_STAGE_EPOCHS, description="Maximum epochs of phase 1 (early stopping may end it sooner)."
    )
    learning_rate: LearningRate = Field(default=1.0e-3, description="Adam learning rate of phase 1 (0 < lr < 1).")


class FineTunePhaseSpec(SpecModel):
    """Phase 2: the last layers of the base unfrozen and trained at a low learning rate."""

    epochs: int = Field(
        default=10, ge=0, le=MAX_STAGE_EPOCHS, description="Maximum epochs of phase 2 (early stopping may end it sooner)."
    )
    learning_rate: LearningRate = Field(default=1.0e-5, description="Adam learning rate of phase 2 (0 < lr < 1).")
    unfreeze_last: int = Field(
        default=4,
        ge=0,
        description="How many of the base's last layers become trainable (BatchNorm excepted); 0 skips phase 2.",
    )


class EarlyStoppingSpec(SpecModel):
    """Early stopping on val_loss, in each phase."""

    patience: int = Field(default=5, ge=0, description="Epochs without val_loss improvement before a phase stops.")
    restore_best_weights: bool = Field(
        default=True, description="Whether to restore the weights of the best epoch when a phase stops early."
    )


class ReduceLROnPlateauSpec(SpecModel):
    """Learning-rate reduction when the monitored metric stops improving."""

    monitor: Literal["val_loss", "val_accuracy", "loss", "accuracy"] = Field(
        default="val_loss", description="Metric to watch."
    )
    factor: float = Field(default=0.3, gt=0.0, lt=1.0, description="Factor the learning rate is multiplied by.")
    patience: int = Field(default=3, ge=0, description="Epochs without improvement before the rate is reduced.")


class TrainingSpec(SpecModel):
    """Hyper-parameters of the two phases."""

    batch_size: int = Field(default=32, ge=1, description="Images per batch.")
    head: HeadPhaseSpec = Field(default_factory=HeadPhaseSpec, description="Phase 1: the head alone.")
    fine_tune: FineTunePhaseSpec = Field(
        default_factory=FineTunePhaseSpec, description="Phase 2: the last layers of the base unfrozen."
    )
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec, description="Early stopping.")
    reduce_lr_on_plateau: ReduceLROnPlateauSpec = Field(
        default_factory=ReduceLROnPlateauSpec,
        alias="reduceLROnPlateau",
        description="Learning-rate reduction on plateau.",
    )
    mixed_precision: Literal["auto", "off", "mixed_float16", "mixed_bfloat16"] = Field(
        default="auto",
        description="Keras mixed-precision policy; auto means mixed_float16 on a GPU and off on a CPU.",
    )
    seed: int = Field(default=1234, ge=0, le=2**32 - 1, description="Random seed for shuffling, splitting and initialisation.")

    @property
    def total_epochs(self) -> int:
        """Planned epochs of both phases (phase 2 counts only when it runs)."""
        return self.head.epochs + (self.fine_tune.epochs if self.fine_tune.unfreeze_last > 0 else 0)


class OutputSpec(SpecModel):
    """Where the trainer writes the model, metrics, checkpoints and logs."""

    path: PathText = Field(
        description="Output folder: model.keras, saved_model/, metrics.json, ...",
    )


class TrainerSpec(SpecModel):
    """The part of a FineTuneJob spec that says what to train; a local run reads only this."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="The base model and the new head.")
    data: DataSpec = Field(description="The images to train and validate on.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyper-parameters of the two phases.")
    output: OutputSpec = Field(description="Where the trained model and its metrics go.")


def format_validation_error(error: ValidationError, *, prefix: str = "spec") -> str:
    """One line naming each bad field by its path as users type it, e.g. spec.training.head.epochs."""
    parts: list[str] = []
    for item in error.errors():
        path = ".".join([prefix, *(str(p) for p in item["loc"])]) if item["loc"] else prefix
        parts.append(f"{path}: {item['msg']}")
    return "; ".join(parts)
