"""The evaluation of the final model: per-class numbers, the confusion matrix, and report.html.

After training, `train.py` hands the final model's validation predictions to
`evaluate_and_report`, which returns keys to add to metrics.json:

- `evaluation`: accuracy, per-class precision, recall, F1 and support, their macro and
  weighted averages, the confusion matrix (rows: true class, columns: predicted class, both in
  classes.json order) and the most confused class pairs. Up to `DENSE_MATRIX_MAX_CLASSES`
  classes the matrix is dense (`confusionMatrix`); above it `confusionMatrix` is null and
  `confusionMatrixSparse` lists the non-zero cells as `[true, predicted, count]`.
- `report`: whether `report.html` (beside the model) and the TensorBoard image were written,
  why not, and the seconds it took. Drawing is a view of the model, never part of the
  product: any error in it is logged and recorded here, and training succeeds all the same.

`report.html` is one self-contained page (its pictures are PNG data: URIs, a
Content-Security-Policy forbids everything else): the loss, accuracy and learning-rate curves
of both stages with the stage boundary and the learning-rate drops marked, the confusion matrix,
the per-class table, the most confused pairs, the timings and images/s, and the spec that
produced it. Class names and spec strings are user input: everything on the page is escaped,
and matplotlib's mathtext is off so a `$` in a class name is only a character.

Large class counts stay readable: above `ANNOTATED_MAX_CLASSES` classes the full matrix is
drawn without numbers in its cells (above `TICK_LABELS_MAX_CLASSES` without class names
either) and a second, annotated matrix zooms on the classes of the most confused pairs.

`evaluate`, `learning_rate_drops`, `matrix_layout` and `render_report` are pure; matplotlib
(the Agg canvas, no pyplot and no global backend) and TensorFlow are imported only to draw.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ANNOTATED_MAX_CLASSES",
    "DENSE_MATRIX_MAX_CLASSES",
    "TENSORBOARD_RUN",
    "TENSORBOARD_TAG",
    "ClassMetrics",
    "Confusion",
    "Evaluation",
    "LearningRateDrop",
    "MatrixLayout",
    "evaluate",
    "evaluate_and_report",
    "learning_rate_drops",
    "matrix_layout",
    "render_report",
]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
TENSORBOARD_RUN = "evaluation"  # tensorboard/evaluation/ beside tensorboard/head/ and tensorboard/fine-tune/
TENSORBOARD_TAG = "confusion_matrix"
ANNOTATED_MAX_CLASSES = 30  # up to this many classes every cell shows its count
TICK_LABELS_MAX_CLASSES = 100  # up to this many the full matrix names its classes
DENSE_MATRIX_MAX_CLASSES = 200  # up to this many metrics.json holds the dense matrix
ZOOM_CLASSES = 20  # the zoomed matrix: at most this many classes
TOP_CONFUSIONS = 20  # pairs listed in metrics.json and on the page
_LABEL_CHARS = 28  # class names in pictures are cut to this many characters (the tables have them whole)
_DPI = 100
_ERROR_CHARS = 500


@dataclass(frozen=True)
class ClassMetrics:
    """One class's numbers; None where the ratio is 0/0 (never predicted, or no images)."""

    name: str
    precision: float | None
    recall: float | None
    f1: float | None
    support: int


@dataclass(frozen=True)
class Confusion:
    """`count` images of class `true` predicted as `predicted` (`rate`: of the true class's images)."""

    true: str
    predicted: str
    true_index: int
    predicted_index: int
    count: int
    rate: float


@dataclass(frozen=True)
class Evaluation:
    """The final model on the validation split."""

    class_names: tuple[str, ...]
    matrix: npt.NDArray[np.int64]  # [true, predicted], classes.json order
    per_class: tuple[ClassMetrics, ...]
    accuracy: float | None  # None without validation images
    macro: Mapping[str, float | None]  # precision, recall, f1: the mean over classes where defined
    weighted: Mapping[str, float | None]  # the same, weighted by support
    most_confused: tuple[Confusion, ...]

    @property
    def images(self) -> int:
        return int(self.matrix.sum())

    def to_json(self) -> dict[str, Any]:
        """The `evaluation` entry of metrics.json."""
        body: dict[str, Any] = {
            "images": self.images,
            "accuracy": _round(self.accuracy),
            "perClass": [
                {
                    "class": c.name,
                    "precision": _round(c.precision),
                    "recall": _round(c.recall),
                    "f1": _round(c.f1),
                    "support": c.support,
                }
                for c in self.per_class
            ],
            "macroAvg": {k: _round(v) for k, v in self.macro.items()},
            "weightedAvg": {k: _round(v) for k, v in self.weighted.items()},
            "mostConfused": [
                {"true": c.true, "predicted": c.predicted, "count": c.count, "rateOfTrue": _round(c.rate)}
                for c in self.most_confused
            ],
        }
        if len(self.class_names) <= DENSE_MATRIX_MAX_CLASSES:
            body["confusionMatrix"] = self.matrix.tolist()
        else:
            true_idx, pred_idx = np.nonzero(self.matrix)
            body["confusionMatrix"] = None
            body["confusionMatrixSparse"] = [
                [int(t), int(p), int(self.matrix[t, p])] for t, p in zip(true_idx, pred_idx, strict=True)
            ]
        return body


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _mean(values: Sequence[float | None], weights: Sequence[int] | None = None) -> float | None:
    pairs = [(v, 1 if weights is None else weights[i]) for i, v in enumerate(values) if v is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def evaluate(
    *,
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    class_names: Sequence[str],
    top: int = TOP_CONFUSIONS,
) -> Evaluation:
    """Per-class precision/recall/F1/support, the confusion matrix and the `top` most confused pairs.

    F1 is 2TP / (2TP + FP + FN), so a class with images that is never predicted has F1 0 and
    precision None. Labels must be indexes into `class_names`.
    """
    names = tuple(str(n) for n in class_names)
    n = len(names)
    truth = np.asarray(y_true, dtype=np.int64).reshape(-1)
    predicted = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if truth.shape != predicted.shape:
        raise ValueError(f"y_true has {truth.size} labels, y_pred {predicted.size}")
    if n == 0:
        raise ValueError("no class names")
    for what, values in (("y_true", truth), ("y_pred", predicted)):
        if values.size and (values.min() < 0 or values.max() >= n):
            raise ValueError(f"{what} holds a label outside 0..{n - 1}")
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)

    tp = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted_count = matrix.sum(axis=0)
    per_class = []
    for i, name in enumerate(names):
        fp = int(predicted_count[i] - tp[i])
        fn = int(support[i] - tp[i])
        per_class.append(
            ClassMetrics(
                name=name,
                precision=_ratio(int(tp[i]), int(predicted_count[i])),
                recall=_ratio(int(tp[i]), int(support[i])),
                f1=_ratio(2 * int(tp[i]), 2 * int(tp[i]) + fp + fn),
                support=int(support[i]),
            )
        )
    supports = [c.support for c in per_class]
    macro = {k: _mean([getattr(c, k) for c in per_class]) for k in ("precision", "recall", "f1")}
    weighted = {k: _mean([getattr(c, k) for c in per_class], supports) for k in ("precision", "recall", "f1")}

    off = matrix.copy()
    np.fill_diagonal(off, 0)
    true_idx, pred_idx = np.nonzero(off)
    counts = off[true_idx, pred_idx]
    # Most images first; ties in classes.json order (lexsort: the last key is the primary one).
    order = np.lexsort((pred_idx, true_idx, -counts))[: max(0, top)]
    most_confused = tuple(
        Confusion(
            true=names[int(true_idx[k])],
            predicted=names[int(pred_idx[k])],
            true_index=int(true_idx[k]),
            predicted_index=int(pred_idx[k]),
            count=int(counts[k]),
            rate=int(counts[k]) / int(support[int(true_idx[k])]),
        )
        for k in order
    )
    return Evaluation(
        class_names=names,
        matrix=matrix,
        per_class=tuple(per_class),
        accuracy=_ratio(int(tp.sum()), int(truth.size)),
        macro=macro,
        weighted=weighted,
        most_confused=most_confused,
    )


@dataclass(frozen=True)
class LearningRateDrop:
    """The learning rate fell to `to` after epoch `after` (a global epoch number, both stages counted)."""

    stage: str
    after: int
    to: float


def _global_epochs(history: Sequence[Mapping[str, Any]]) -> list[int]:
    """Each row's epoch counted across stages: fine-tune epoch 1 follows the head's last epoch."""
    offset, last, current, xs = 0, 0, None, []
    for row in history:
        stage = str(row.get("stage"))
        if stage != current:
            offset, current = last, stage
        x = offset + int(row.get("epoch", 0))
        xs.append(x)
        last = max(last, x)
    return xs


def learning_rate_drops(
    *, history: Sequence[Mapping[str, Any]], initial: Mapping[str, float | None]
) -> list[LearningRateDrop]:
    """Where ReduceLROnPlateau cut the rate: history.csv records the rate after each epoch's callbacks.

    `initial` is each stage's configured learning rate (a drop after its first epoch is one
    too); a stage's start at its own new rate is not a drop.
    """
    drops: list[LearningRateDrop] = []
    previous: dict[str, float | None] = {}
    for x, row in zip(_global_epochs(history), history, strict=True):
        stage = str(row.get("stage"))
        lr = _number(row.get("learning_rate"))
        if stage not in previous:
            previous[stage] = _number(initial.get(stage))
        before = previous[stage]
        if lr is not None and before is not None and lr < before * (1 - 1e-6):
            drops.append(LearningRateDrop(stage=stage, after=x, to=lr))
        if lr is not None:
            previous[stage] = lr
    return drops


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class MatrixLayout:
    """How a confusion matrix of `classes` classes is drawn so that it stays readable."""

    classes: int
    annotate: bool  # counts in the cells
    tick_labels: bool  # class names on the axes
    font_size: float
    inches: float


def matrix_layout(classes: int) -> MatrixLayout:
    """Cells with counts up to 30 classes, names up to 100, and a picture at most ~17 in square."""
    if classes <= 12:
        return MatrixLayout(classes=classes, annotate=True, tick_labels=True, font_size=10.0,
                            inches=max(4.5, 0.6 * classes + 3.0))
    if classes <= ANNOTATED_MAX_CLASSES:
        return MatrixLayout(classes=classes, annotate=True, tick_labels=True, font_size=7.0,
                            inches=0.42 * classes + 3.0)
    if classes <= TICK_LABELS_MAX_CLASSES:
        return MatrixLayout(classes=classes, annotate=False, tick_labels=True, font_size=6.0,
                            inches=min(17.0, 0.14 * classes + 3.0))
    return MatrixLayout(classes=classes, annotate=False, tick_labels=False, font_size=8.0, inches=12.0)


def zoom_classes(evaluation: Evaluation, *, limit: int = ZOOM_CLASSES) -> list[int]:
    """The classes of the most confused pairs, in the order they first appear, at most `limit`."""
    chosen: list[int] = []
    for pair in evaluation.most_confused:
        for index in (pair.true_index, pair.predicted_index):
            if index not in chosen and len(chosen) < limit:
                chosen.append(index)
    return sorted(chosen)


# Drawing (matplotlib, Agg canvas).


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _short(name: str) -> str:
    return name if len(name) <= _LABEL_CHARS else name[: _LABEL_CHARS - 1] + "…"


def draw_confusion(*, evaluation: Evaluation, indexes: Sequence[int] | None = None, title: str) -> bytes:
    """A PNG of the confusion matrix (or of its rows/columns `indexes`), cells coloured by the true class's rate."""
    import matplotlib

    chosen = list(range(len(evaluation.class_names))) if indexes is None else list(indexes)
    matrix = evaluation.matrix[np.ix_(chosen, chosen)]
    support = evaluation.matrix.sum(axis=1)[chosen].astype(np.float64)
    rates = matrix / np.where(support > 0, support, 1.0)[:, None]
    layout = matrix_layout(len(chosen))
    # Class names are user input: parse_math=False wherever they are drawn, so `$` is a character.
    with matplotlib.rc_context({"text.usetex": False}):
        figure = _new_figure(layout.inches + 1.2, layout.inches)
        axes = figure.add_subplot()
        image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's images")
        axes.set_title(title, fontsize=11)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        if layout.tick_labels:
            labels = [_short(evaluation.class_names[i]) for i in chosen]
            axes.set_xticks(range(len(chosen)), labels, rotation=90, fontsize=layout.font_size, parse_math=False)
            axes.set_yticks(range(len(chosen)), labels, fontsize=layout.font_size, parse_math=False)
        else:
            axes.set_xticks([])
            axes.set_yticks([])
        if layout.annotate:
            for (t, p), count in np.ndenumerate(matrix):
                if count:
                    axes.text(p, t, str(int(count)), ha="center", va="center", fontsize=layout.font_size,
                              color="white" if rates[t, p] > 0.5 else "black")
        return _png(figure)


def draw_curves(*, history: Sequence[Mapping[str, Any]], drops: Sequence[LearningRateDrop]) -> bytes:
    """A PNG of loss, accuracy and learning rate per epoch across both stages."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    xs = _global_epochs(history)
    stages = [str(r.get("stage")) for r in history]
    boundaries = [xs[i - 1] + 0.5 for i in range(1, len(xs)) if stages[i] != stages[i - 1]]
    with matplotlib.rc_context({"text.usetex": False}):
        figure = _new_figure(15.0, 4.4)
        panels: list[tuple[str, tuple[str, ...]]] = [
            ("loss", ("loss", "val_loss")),
            ("accuracy", ("accuracy", "val_accuracy")),
            ("learning rate", ("learning_rate",)),
        ]
        for column, (title, keys) in enumerate(panels, start=1):
            axes: Axes = figure.add_subplot(1, 3, column)
            axes.set_title(title)
            axes.set_xlabel("epoch (both stages)")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            for key in keys:
                points = [(x, v) for x, r in zip(xs, history, strict=True) if (v := _number(r.get(key))) is not None]
                if points:
                    axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                              label="validation" if key.startswith("val_") else "training")
            if "learning_rate" in keys and any(_number(r.get("learning_rate")) for r in history):
                axes.set_yscale("log")
            else:
                axes.ticklabel_format(axis="y", useOffset=False)
            for boundary in boundaries:
                axes.axvline(boundary, color="grey", linestyle="--", linewidth=1.2, label="fine-tune starts")
            for drop in drops:
                axes.axvline(drop.after + 0.5, color="tab:red", linestyle=":", linewidth=1.2,
                             label=f"learning rate → {drop.to:.3g}")
            if not history:
                axes.text(0.5, 0.5, "no epochs were run", ha="center", va="center", transform=axes.transAxes)
            handles, labels = axes.get_legend_handles_labels()
            unique = dict(zip(labels, handles, strict=True))
            if unique:
                axes.legend(list(unique.values()), list(unique.keys()), fontsize=8)
            axes.grid(alpha=0.3)
        return _png(figure)


# The page.


@dataclass(frozen=True)
class Pictures:
    """The report's PNGs (None: not drawn)."""

    curves: bytes | None
    confusion: bytes | None
    zoom: bytes | None = None


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1500px;padding:0 1em;color:#222}
h1{font-size:1.5em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0} th,td{border:1px solid #ddd;padding:.25em .6em}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:.5em 0} pre{background:#f7f7f7;padding:1em;overflow:auto}
p.note{color:#555}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    if number is None:
        return "—" if value is None else _e(value)
    if float(number).is_integer() and abs(number) < 1e15 and not isinstance(value, float):
        return f"{int(number):,}"
    return f"{number:.{digits}f}"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="note">{_e(alt)}: not drawn.</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(
    *,
    evaluation: Evaluation,
    pictures: Pictures,
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    spec: Mapping[str, Any],
    drops: Sequence[LearningRateDrop] = (),
) -> str:
    """The whole report.html; every value that came from the spec, the data or the run is escaped."""
    n = len(evaluation.class_names)
    base = spec.get("model", {}).get("base", "model") if isinstance(spec.get("model"), Mapping) else "model"
    final = metrics.get("final", {}) if isinstance(metrics.get("final"), Mapping) else {}
    images = metrics.get("images", {}) if isinstance(metrics.get("images"), Mapping) else {}
    summary_rows = [
        ["validation accuracy (final model)", _fmt(evaluation.accuracy)],
        ["validation loss (final model)", _fmt(final.get("val_loss"))],
        ["best validation accuracy (any epoch)", _fmt((metrics.get("best") or {}).get("val_accuracy"))],
        ["macro F1", _fmt(evaluation.macro.get("f1"))],
        ["classes", _fmt(n)],
        ["training images", _fmt(images.get("train"))],
        ["validation images", _fmt(evaluation.images)],
        ["skipped files", _fmt(metrics.get("skippedFiles"))],
        ["mixed precision", _e(metrics.get("mixedPrecision", "—"))],
        ["model", _e(metrics.get("modelPath", "—"))],
    ]
    per_class_rows = [
        [_e(c.name), _fmt(c.precision), _fmt(c.recall), _fmt(c.f1), _fmt(c.support)] for c in evaluation.per_class
    ]
    per_class_rows += [
        ["<b>macro average</b>", *(_fmt(evaluation.macro.get(k)) for k in ("precision", "recall", "f1")), _fmt(evaluation.images)],
        ["<b>weighted average</b>", *(_fmt(evaluation.weighted.get(k)) for k in ("precision", "recall", "f1")),
         _fmt(evaluation.images)],
    ]
    confused_rows = [
        [_e(c.true), _e(c.predicted), _fmt(c.count), f"{100 * c.rate:.1f} %"] for c in evaluation.most_confused
    ]
    stages = metrics.get("stages", {}) if isinstance(metrics.get("stages"), Mapping) else {}
    timing_rows = []
    for stage, s in stages.items():
        if not isinstance(s, Mapping):
            continue
        timing_rows.append([
            _e(stage),
            f"{_fmt(s.get('epochsRun'))} / {_fmt(s.get('epochsPlanned'))}" + (" (stopped early)" if s.get("stoppedEarly") else ""),
            _fmt(s.get("durationSeconds"), 1), _fmt(s.get("trainSeconds"), 1), _fmt(s.get("extractionSeconds"), 1),
            _fmt(s.get("cpuSeconds"), 1), _fmt(s.get("imagesPerSecond"), 1), _fmt(s.get("learningRate"), 6),
            _fmt(s.get("finalLearningRate"), 6), _e(s.get("fastPath", "—")),
            "yes" if s.get("completedInEarlierRun") else "no",
        ])
    history_rows = [
        [_e(r.get("stage")), _fmt(r.get("epoch")), *(_fmt(r.get(k)) for k in ("loss", "accuracy", "val_loss", "val_accuracy")),
         _fmt(r.get("learning_rate"), 6), _fmt(r.get("seconds"), 2)]
        for r in history
    ]
    drops_note = (
        "Learning-rate drops (dotted red): " + ", ".join(f"after epoch {d.after} to {d.to:.3g}" for d in drops) + "."
        if drops else "The learning rate was not reduced."
    )
    big = n > ANNOTATED_MAX_CLASSES
    matrix_note = (
        f"{n} classes: the full matrix shows the share of each true class's images by colour only"
        + ("" if n <= TICK_LABELS_MAX_CLASSES else ", without class names")
        + f"; the second matrix zooms on the classes of the {len(evaluation.most_confused)} most confused pairs, with counts."
        if big else "Each cell counts images; the colour is the share of the true class's images. Rows and columns follow classes.json."
    )
    spec_text = json.dumps(spec, indent=2, sort_keys=False, ensure_ascii=False, default=str)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Fine-tuning report: {_e(base)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Fine-tuning report: {_e(base)}</h1>",
        '<section id="summary"><h2>Summary</h2>', _table(["", "value"], summary_rows), "</section>",
        '<section id="curves"><h2>Loss and accuracy</h2>',
        f'<p class="note">Both stages, one epoch axis; the dashed grey line is where fine-tuning starts. {_e(drops_note)}</p>',
        _img(pictures.curves, "loss, accuracy and learning rate per epoch"), "</section>",
        '<section id="confusion"><h2>Confusion matrix</h2>', f'<p class="note">{_e(matrix_note)}</p>',
        _img(pictures.confusion, "confusion matrix"),
        _img(pictures.zoom, "confusion matrix of the most confused classes") if big else "",
        "</section>",
        '<section id="per-class"><h2>Per class</h2>',
        '<p class="note">Precision: of the images predicted as the class, the share that are; recall: of the class\'s '
        "images, the share found; — where the ratio is 0/0.</p>",
        _table(["class", "precision", "recall", "F1", "support"], per_class_rows), "</section>",
        '<section id="most-confused"><h2>Most confused pairs</h2>',
        _table(["true class", "predicted as", "images", "of the true class"], confused_rows, numeric_from=2)
        if confused_rows else '<p class="note">No validation image was misclassified.</p>',
        "</section>",
        '<section id="timings"><h2>Timings</h2>',
        _table(["stage", "epochs", "wall s", "training s", "feature extraction s", "CPU s", "images/s",
                "learning rate", "final learning rate", "fast path", "from an earlier run"], timing_rows),
        f'<p class="note">Whole run: {_fmt(metrics.get("durationSeconds"), 1)} s until the outputs were written.</p>',
        _table(["stage", "epoch", "loss", "accuracy", "val loss", "val accuracy", "learning rate", "seconds"],
               history_rows, numeric_from=1),
        "</section>",
        '<section id="spec"><h2>Spec</h2>', f"<pre>{_e(spec_text)}</pre>", "</section>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# Hooked into train.py.


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:_ERROR_CHARS] if text else type(exc).__name__


def _write_tensorboard(*, directory: Path, png: bytes, step: int) -> None:
    import tensorflow as tf

    image = tf.image.decode_png(png, channels=4)
    writer = tf.summary.create_file_writer(str(directory))
    try:
        with writer.as_default():
            tf.summary.image(TENSORBOARD_TAG, image[None], step=step,
                             description="The final model's confusion matrix on the validation split.")
        writer.flush()
    finally:
        writer.close()


def evaluate_and_report(
    *,
    out: Path,
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    class_names: Sequence[str],
    history: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    spec: Mapping[str, Any],
) -> dict[str, Any]:
    """Evaluates, writes out/report.html and the TensorBoard image; returns metrics.json's new keys.

    Never raises an Exception: whatever fails is logged and recorded under `report` (a
    termination, a BaseException, still passes through).
    """
    started = time.monotonic()
    result: dict[str, Any] = {}
    report: dict[str, Any] = {"written": False, "path": None, "error": None, "tensorboardImage": False,
                              "tensorboardError": None, "seconds": 0.0}
    result["report"] = report
    try:
        evaluation = evaluate(y_true=y_true, y_pred=y_pred, class_names=class_names)
        result["evaluation"] = evaluation.to_json()
    except Exception as exc:
        log.warning("evaluation failed (training is not affected): %s", exc, exc_info=True)
        report["error"] = f"evaluation: {_reason(exc)}"
        result["evaluation"] = None
        return result

    target = out / REPORT_FILE
    confusion_png: bytes | None = None
    try:
        stages = metrics.get("stages", {})
        initial = {name: s.get("learningRate") for name, s in stages.items() if isinstance(s, Mapping)}
        drops = learning_rate_drops(history=history, initial=initial)
        n = len(evaluation.class_names)
        confusion_png = draw_confusion(
            evaluation=evaluation,
            title=f"confusion matrix ({n} classes, {evaluation.images} validation images)",
        )
        zoom = None
        if n > ANNOTATED_MAX_CLASSES and evaluation.most_confused:
            zoom = draw_confusion(evaluation=evaluation, indexes=zoom_classes(evaluation),
                                  title="the classes of the most confused pairs")
        pictures = Pictures(curves=draw_curves(history=history, drops=drops), confusion=confusion_png, zoom=zoom)
        page = render_report(evaluation=evaluation, pictures=pictures, history=history, metrics=metrics,
                             spec=spec, drops=drops)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
        report.update(written=True, path=str(target))
    except Exception as exc:
        log.warning("%s not written (training is not affected): %s", REPORT_FILE, exc, exc_info=True)
        report["error"] = _reason(exc)
        target.unlink(missing_ok=True)  # never leave an earlier run's report beside this model
    if confusion_png is not None:
        try:
            _write_tensorboard(directory=out / "tensorboard" / TENSORBOARD_RUN, png=confusion_png, step=len(history))
            report["tensorboardImage"] = True
        except Exception as exc:
            log.warning("confusion matrix not written to TensorBoard: %s", exc, exc_info=True)
            report["tensorboardError"] = _reason(exc)
    else:
        report["tensorboardError"] = "the confusion matrix was not drawn"
    report["seconds"] = round(time.monotonic() - started, 3)  # what the report added to the run
    return result
