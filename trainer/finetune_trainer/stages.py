"""The training stages: what each one trains, at what rate, and what it fits on.

`plan_stages` turns the spec into the stages to run, in order (phase 1 "head", phase 2
"fine-tune"). `train._run` runs each the same way:

1. `TrainingStage.prepare` sets which layers train (the head alone, or the base's last
   layers as well) and names them;
2. `plan_inputs` decides what the stage fits on and extracts it: the network below its first
   trainable layer is frozen (`frozen_cut`), so its output for images that never change is
   computed once, for the validation images always and for the training images too when
   they are not augmented, as far as the cache budget allows (`choose_fast_path`, pure);
3. `train._fit_stage` fits the stage's callbacks around `StageInputs.model`, and
   `train._finish_stage` saves its weights and summary for a resume.

A third phase, or a cut at another layer, is one more `TrainingStage` or `FrozenCut`; the
loop does not change.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from finetune_contract.protocol import Stage
from finetune_contract.spec import TrainerSpec

from finetune_trainer import data as data_lib
from finetune_trainer import features as features_lib
from finetune_trainer import model as model_lib

__all__ = ["FrozenCut", "StageInputs", "TrainingStage", "choose_fast_path", "frozen_cut", "plan_inputs", "plan_stages"]

log = logging.getLogger(__name__)

CutKind = Literal["features", "prefix"]
FLOAT_BYTES = 4  # cached activations are float32


@dataclass(frozen=True)
class TrainingStage:
    """One phase of training: its epochs, learning rate and the layers it trains."""

    name: Stage
    epochs: int
    learning_rate: float
    epochs_before: int  # epochs of the stages before it (for progress over the whole run)
    rate_field: str  # the spec field to lower when it diverges, e.g. "spec.training.head.learningRate"
    unfreeze_last: int | None = None  # None: the base stays frozen; n: its last n layers train too

    @property
    def epochs_through(self) -> int:
        """Planned epochs of the run once this stage is done."""
        return self.epochs_before + self.epochs

    def prepare(self, network: model_lib.Network) -> list[str]:
        """Sets which layers train in this stage; returns the names of those with weights."""
        if self.unfreeze_last is None:
            model_lib.freeze_base(network.base)
            return [layer.name for layer in network.head.layers if layer.trainable and layer.weights]
        return model_lib.unfreeze_last(network.base, count=self.unfreeze_last)


def plan_stages(*, spec: TrainerSpec) -> list[TrainingStage]:
    """The stages `spec` asks for, in order; a stage with no epochs (or no layers to unfreeze) is left out."""
    training = spec.training
    stages: list[TrainingStage] = []
    if training.head.epochs > 0:
        stages.append(TrainingStage(
            name="head",
            epochs=training.head.epochs,
            learning_rate=training.head.learning_rate,
            epochs_before=0,
            rate_field="spec.training.head.learningRate",
        ))
    fine = training.fine_tune
    if fine.unfreeze_last > 0 and fine.epochs > 0:
        stages.append(TrainingStage(
            name="fine-tune",
            epochs=fine.epochs,
            learning_rate=fine.learning_rate,
            epochs_before=training.head.epochs,
            rate_field="spec.training.fineTune.learningRate",
            unfreeze_last=fine.unfreeze_last,
        ))
    return stages


@dataclass(frozen=True)
class FrozenCut:
    """The network split below its first trainable layer: a frozen part whose output can be cached."""

    kind: CutKind  # "features": the whole base and its pooling are frozen; "prefix": the base's lower layers
    below: str  # the last frozen layer
    frozen: Any  # keras.Model: raw images -> the cut's output (preprocessing included)
    rest: Any  # keras.Model: the cut's output -> class probabilities (layers shared with the full model)
    floats_per_image: int


def frozen_cut(network: model_lib.Network) -> FrozenCut | None:
    """Where the trainable part of `network` starts now; None where no cut below it exists."""
    if not model_lib.fine_tune_layers(network.base):
        return FrozenCut(kind="features", below=network.pool.name, frozen=network.features, rest=network.head,
                         floats_per_image=int(network.head.inputs[0].shape[-1]))
    split = model_lib.split_below_trainable(network)
    if split is None:
        return None
    return FrozenCut(kind="prefix", below=split.cut, frozen=split.prefix, rest=split.rest,
                     floats_per_image=int(np.prod(split.shape)))


FastPath = Literal["features", "validation-features", "prefix", "validation-prefix", "none"]


def choose_fast_path(
    *, kind: CutKind | None, floats_per_image: int, n_train: int, n_validation: int, augmented: bool, budget: int
) -> FastPath:
    """What to cache below the cut: every image when none is augmented, else validation, within `budget` bytes.

    - `kind`: the frozen cut (None: there is none, nothing is cached);
    - training images are cached only without augmentation (augmented ones change every epoch);
    - where everything does not fit `budget`, the validation images alone are cached if they fit.
    """
    if kind is None:
        return "none"
    per_image = floats_per_image * FLOAT_BYTES
    if not augmented and (n_train + n_validation) * per_image <= budget:
        return kind
    if n_validation * per_image <= budget:
        return "validation-features" if kind == "features" else "validation-prefix"
    return "none"


@dataclass
class StageInputs:
    """What a stage fits on, and what its caching did."""

    model: Any  # the model `fit` trains: the full model, or the part above a cached cut
    train: Any  # a tf.data pipeline of images, or the cached training inputs
    validation: Any  # features.CachedValidation, (x, y) arrays, or a tf.data pipeline of images
    fit_kwargs: dict[str, Any] = field(default_factory=dict)
    fast_path: FastPath = "none"
    cached_below: str | None = None
    extracted: int = 0  # images whose frozen output was computed once
    extraction_seconds: float = 0.0
    # The cached validation inputs and the model that maps them to probabilities: the final
    # predictions come from them cheaply once this stage is the last (None: the full model).
    predictor: tuple[Any, np.ndarray] | None = None


def plan_inputs(
    *,
    stage: TrainingStage,
    network: model_lib.Network,
    splits: data_lib.Splits,
    augmentation: data_lib.Augmentation | None,
    batch_size: int,
    seed: int,
    budget: int,
) -> StageInputs:
    """Chooses what `stage` fits on (after `stage.prepare`) and extracts the cached part once."""
    started = time.monotonic()
    cut = frozen_cut(network)
    mode = choose_fast_path(
        kind=cut.kind if cut is not None else None,
        floats_per_image=cut.floats_per_image if cut is not None else 0,
        n_train=len(splits.train),
        n_validation=len(splits.validation),
        augmented=augmentation is not None,
        budget=budget,
    )
    if cut is not None and mode == "none":
        log.info("%s: the output of %s does not fit the cache budget; not cached", stage.name, cut.below)

    def images(images: data_lib.ImageSet, *, shuffle: bool, augment: bool) -> Any:
        return data_lib.make_dataset(images=images, batch_size=batch_size, shuffle=shuffle, seed=seed,
                                     augmentation=augmentation if augment else None)

    if cut is None or mode == "none":
        return StageInputs(
            model=network.model,
            train=images(splits.train, shuffle=True, augment=True),
            validation=images(splits.validation, shuffle=False, augment=False),
            fit_kwargs={"shuffle": False},  # the pipeline shuffles
            extraction_seconds=time.monotonic() - started,
        )
    x_val = features_lib.extract(model=cut.frozen, images=splits.validation, batch_size=batch_size)
    labels = splits.validation.labels
    if mode == cut.kind:  # the training images too: the part above the cut trains on them alone
        inputs = StageInputs(
            model=cut.rest,
            train=features_lib.extract(model=cut.frozen, images=splits.train, batch_size=batch_size),
            validation=(x_val, labels),
            fit_kwargs={"y": splits.train.labels, "batch_size": batch_size, "shuffle": True},
            extracted=len(splits.train) + len(splits.validation),
        )
    else:
        inputs = StageInputs(
            model=network.model,
            train=images(splits.train, shuffle=True, augment=True),
            validation=features_lib.CachedValidation(model=cut.rest, x=x_val, y=labels, batch_size=batch_size),
            fit_kwargs={"shuffle": False},
            extracted=len(splits.validation),
        )
    inputs.fast_path = mode
    inputs.cached_below = cut.below
    inputs.predictor = (cut.rest, x_val)
    inputs.extraction_seconds = time.monotonic() - started
    log.info("%s: output of %s computed once for %d images in %.1fs (%s)",
             stage.name, cut.below, inputs.extracted, inputs.extraction_seconds, mode)
    return inputs
