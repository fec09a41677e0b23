"""The evaluation report: numbers against a hand-computed matrix, report.html in headless Chromium.

The numbers are checked against a confusion matrix worked out by hand. The page comes from
real tiny trainings (`weights: none`, generated images, 1+1 epochs) and from synthetic
evaluations with many classes; Debian's `chromium` opens it headless over the DevTools
protocol (a pipe, no port), takes a screenshot and reads every image's naturalWidth, so a
blank page or a broken data: URI fails. A matplotlib that cannot draw must not fail training.
"""

from __future__ import annotations

import base64
import contextlib
import html.parser
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from finetune_testbed.imagesets import spec_dict, write_image_folder
from finetune_trainer import evaluation as ev
from finetune_trainer.__main__ import main

# A tiny set, worked by hand. Classes a, b, c; rows true, columns predicted:
#        a  b  c
#   a  [ 2  1  1 ]   support 4
#   b  [ 0  3  0 ]   support 3
#   c  [ 2  0  0 ]   support 2
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 1, 0, 2, 1, 1, 1, 0, 0]
MATRIX = [[2, 1, 1], [0, 3, 0], [2, 0, 0]]
# a: TP 2, FP 2, FN 2 -> P 2/4, R 2/4, F1 4/8;  b: TP 3, FP 1, FN 0 -> P 3/4, R 1, F1 6/7;
# c: TP 0, FP 1, FN 2 -> P 0/1, R 0/2, F1 0/3.
PER_CLASS = {"a": (0.5, 0.5, 0.5, 4), "b": (0.75, 1.0, 6 / 7, 3), "c": (0.0, 0.0, 0.0, 2)}

# Class names a user could choose: markup, quotes, mathtext dollars, an ampersand.
HOSTILE = '<img src=x onerror="alert(1)">$x^2$&amp;'

CHROMIUM = shutil.which("chromium")


def test_numbers_match_the_hand_computed_matrix() -> None:
    result = ev.evaluate(y_true=Y_TRUE, y_pred=Y_PRED, class_names=["a", "b", "c"])
    assert result.matrix.tolist() == MATRIX
    assert result.accuracy == pytest.approx(5 / 9)
    for metrics in result.per_class:
        precision, recall, f1, support = PER_CLASS[metrics.name]
        assert metrics.precision == pytest.approx(precision)
        assert metrics.recall == pytest.approx(recall)
        assert metrics.f1 == pytest.approx(f1)
        assert metrics.support == support
    # Macro: plain means over the classes; weighted: by support.
    assert result.macro["precision"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    assert result.macro["recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert result.macro["f1"] == pytest.approx((0.5 + 6 / 7 + 0.0) / 3)
    assert result.weighted["precision"] == pytest.approx((0.5 * 4 + 0.75 * 3 + 0.0 * 2) / 9)
    assert result.weighted["recall"] == pytest.approx((0.5 * 4 + 1.0 * 3 + 0.0 * 2) / 9)
    # Most confused: c->a (2 images), then the ties a->b and a->c in classes.json order.
    pairs = [(c.true, c.predicted, c.count) for c in result.most_confused]
    assert pairs == [("c", "a", 2), ("a", "b", 1), ("a", "c", 1)]
    assert result.most_confused[0].rate == pytest.approx(1.0)
    assert result.most_confused[1].rate == pytest.approx(0.25)
    body = result.to_json()
    assert body["confusionMatrix"] == MATRIX
    assert body["perClass"][2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert json.loads(json.dumps(body, allow_nan=False)) == body  # plain JSON: no NaN, no numpy types


def test_0_over_0_is_none_and_left_out_of_the_averages() -> None:
    result = ev.evaluate(y_true=[0, 0, 1, 3], y_pred=[0, 1, 1, 0], class_names=["a", "b", "empty", "missed"], top=1)
    a, _, empty, missed = result.per_class
    assert (empty.precision, empty.recall, empty.f1, empty.support) == (None, None, None, 0)  # no images, never predicted
    assert (missed.precision, missed.recall, missed.f1, missed.support) == (None, 0.0, 0.0, 1)  # never predicted
    assert (a.precision, a.recall, a.f1) == (pytest.approx(1 / 2), pytest.approx(1 / 2), pytest.approx(2 / 4))
    assert result.macro["precision"] == pytest.approx((0.5 + 0.5) / 2)
    assert result.macro["recall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert result.weighted["recall"] == pytest.approx((0.5 * 2 + 1.0 * 1 + 0.0 * 1) / 4)
    assert [(c.true, c.predicted) for c in result.most_confused] == [("a", "b")]  # top=1 of two pairs


@pytest.mark.parametrize(
    ("y_true", "y_pred", "names", "message"),
    [([0, 1], [0], ["a", "b"], "y_pred 1"), ([0, 2], [0, 0], ["a", "b"], "y_true holds a label"),
     ([0], [-1], ["a"], "y_pred holds a label"), ([], [], [], "no class names")],
)
def test_bad_labels_are_refused(y_true: list[int], y_pred: list[int], names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ev.evaluate(y_true=y_true, y_pred=y_pred, class_names=names)


def test_many_classes_go_sparse_in_metrics_json() -> None:
    n = ev.DENSE_MATRIX_MAX_CLASSES + 1
    y_true = np.arange(n)
    y_pred = (y_true + (y_true % 7 == 0)) % n  # every 7th image predicted as the next class
    body = ev.evaluate(y_true=y_true, y_pred=y_pred, class_names=[f"k{i}" for i in range(n)]).to_json()
    assert body["confusionMatrix"] is None
    cells = {(t, p): c for t, p, c in body["confusionMatrixSparse"]}
    assert len(cells) == n and sum(cells.values()) == n
    assert cells[(0, 1)] == 1 and cells[(1, 1)] == 1 and (0, 0) not in cells


def test_learning_rate_drops_and_the_epoch_axis_across_stages() -> None:
    history = [
        {"stage": "head", "epoch": 1, "learning_rate": 1e-3},
        {"stage": "head", "epoch": 2, "learning_rate": 1e-3},
        {"stage": "head", "epoch": 3, "learning_rate": 5e-4},  # reduced at the end of epoch 3
        {"stage": "fine-tune", "epoch": 1, "learning_rate": 5e-6},  # reduced at once (initial 1e-5)
        {"stage": "fine-tune", "epoch": 2, "learning_rate": 5e-6},
    ]
    assert ev._global_epochs(history) == [1, 2, 3, 4, 5]
    drops = ev.learning_rate_drops(history=history, initial={"head": 1e-3, "fine-tune": 1e-5})
    assert [(d.stage, d.after, d.to) for d in drops] == [("head", 3, 5e-4), ("fine-tune", 4, 5e-6)]
    # Without a stage's initial rate its first epoch is the reference: the start is not a drop.
    assert [d.after for d in ev.learning_rate_drops(history=history, initial={})] == [3]


def test_large_class_counts_stay_readable() -> None:
    small, mid, many = ev.matrix_layout(10), ev.matrix_layout(45), ev.matrix_layout(500)
    assert small.annotate and small.tick_labels
    assert not mid.annotate and mid.tick_labels and not many.tick_labels
    assert all(layout.inches <= 17 for layout in (ev.matrix_layout(n) for n in range(1, 1001)))
    # Cells with numbers are never smaller than 0.4 in (40 px at the report's 100 dpi).
    assert all(ev.matrix_layout(n).inches / n >= 0.4 for n in range(1, ev.ANNOTATED_MAX_CLASSES + 1))
    evaluation = _synthetic(45)
    zoom = ev.zoom_classes(evaluation)
    assert 2 <= len(zoom) <= ev.ZOOM_CLASSES and ev.matrix_layout(len(zoom)).annotate
    assert {c.true_index for c in evaluation.most_confused[:5]} <= set(zoom)


def _synthetic_labels(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten images per class, a quarter of them predicted as one of the next three classes."""
    rng = np.random.default_rng(seed)
    y_true = np.repeat(np.arange(n), 10)
    y_pred = y_true.copy()
    wrong = rng.random(y_true.size) < 0.25
    y_pred[wrong] = (y_true[wrong] + rng.integers(1, 4, wrong.sum())) % n
    return y_true, y_pred


def _synthetic(n: int) -> ev.Evaluation:
    y_true, y_pred = _synthetic_labels(n)
    return ev.evaluate(y_true=y_true, y_pred=y_pred, class_names=[f"class {i:03d}" for i in range(n)])


def _history(head: int = 3, fine: int = 2) -> list[dict[str, Any]]:
    rows = [{"stage": "head", "epoch": e, "loss": 1.0 / e, "accuracy": 0.5 + 0.1 * e, "val_loss": 1.1 / e,
             "val_accuracy": 0.45 + 0.1 * e, "learning_rate": 1e-3 if e < 3 else 5e-4, "seconds": 1.0}
            for e in range(1, head + 1)]
    rows += [{"stage": "fine-tune", "epoch": e, "loss": 0.3 / e, "accuracy": 0.85, "val_loss": 0.35,
              "val_accuracy": 0.8, "learning_rate": 1e-5, "seconds": 2.0} for e in range(1, fine + 1)]
    return rows


class _Tags(html.parser.HTMLParser):
    """Every start tag and its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def _check_self_contained(page: str) -> list[bytes]:
    """No script, no handler attribute, no outside reference, every PNG whole; returns the PNGs."""
    from PIL import Image

    tags = _tags(page)
    assert not [t for t, _ in tags if t in ("script", "iframe", "object", "embed", "link")]
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]
    pngs = []
    for tag, attrs in tags:
        if tag == "img":
            src = attrs["src"] or ""
            assert src.startswith("data:image/png;base64,")
            png = base64.b64decode(src.split(",", 1)[1], validate=True)
            Image.open(io.BytesIO(png)).load()  # raises on a truncated or damaged PNG (browsers show part of it)
            pngs.append(png)
    return pngs


def test_user_input_is_escaped_on_the_page() -> None:
    names = [HOSTILE, "</td></tr></table><h1>owned</h1>", "plain"]
    evaluation = ev.evaluate(y_true=[0, 1, 2, 0], y_pred=[1, 1, 2, 0], class_names=names)
    spec = {"model": {"base": "</title><script>alert(2)</script>"}, "data": {"train": "/d/</pre><b>x</b>"}}
    page = ev.render_report(evaluation=evaluation, pictures=ev.Pictures(curves=None, confusion=None),
                            history=_history(), metrics={"stages": {}}, spec=spec)
    _check_self_contained(page)
    assert "<h1>owned</h1>" not in page and "<script>" not in page and "<b>x</b>" not in page
    assert [t for t, _ in _tags(page)].count("h1") == 1
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;$x^2$&amp;amp;" in page
    assert "&lt;/title&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert 'content="default-src \'none\'; img-src data:' in page


def test_hostile_class_names_draw() -> None:
    """A `$` in a class name is not mathtext (an unbalanced one would make matplotlib raise)."""
    evaluation = ev.evaluate(y_true=[0, 1, 2], y_pred=[1, 1, 2], class_names=["$", HOSTILE, "a" * 300])
    png = ev.draw_confusion(evaluation=evaluation, title="t")
    assert png.startswith(b"\x89PNG")


# Headless Chromium over the DevTools protocol (--remote-debugging-pipe: fd 3 in, fd 4 out).


class Chromium:
    """One headless Chromium; `open` loads a page and answers its images and a screenshot."""

    def __init__(self, profile: Path, *, timeout: float = 60.0) -> None:
        assert CHROMIUM is not None
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "chromium", CHROMIUM,
             "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing anyway below
            self._send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._to_browser)
        os.close(self._from_browser)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, "chromium did not answer in time"
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                assert chunk, f"chromium closed the pipe (exit {self.proc.poll()})"
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def _send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer["error"]
                result: dict[str, Any] = answer["result"]
                return result
            self.events.append(answer)

    def _wait_event(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._read(deadline))

    def open(self, page: Path, *, width: int = 1400) -> tuple[list[dict[str, Any]], bytes]:
        """Loads `page`; returns each img's {alt, complete, width, height} and a full-page PNG."""
        target = self._send("Target.createTarget", url="about:blank")["targetId"]
        session = self._send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self._send("Page.enable", session)
        self._send("Emulation.setDeviceMetricsOverride", session, width=width, height=900, deviceScaleFactor=1,
                   mobile=False)
        self.events.clear()
        self._send("Page.navigate", session, url=page.as_uri())
        self._wait_event("Page.loadEventFired", session)
        # decode() rejects an image the browser cannot decode whole; naturalWidth is 0 for a broken one.
        script = ("Promise.all(Array.from(document.images, i => i.decode().then(() => true, () => false)"
                  ".then(decoded => ({alt: i.alt, complete: i.complete, decoded: decoded, "
                  "width: i.naturalWidth, height: i.naturalHeight})))).then(JSON.stringify)")
        value = self._send("Runtime.evaluate", session, expression=script, returnByValue=True,
                           awaitPromise=True)["result"]["value"]
        images: list[dict[str, Any]] = json.loads(value)
        shot = self._send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
        self._send("Target.closeTarget", targetId=target)
        return images, base64.b64decode(shot["data"])


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make deps-debian)")
    browser = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield browser
    finally:
        browser.close()


def _assert_shows(images: list[dict[str, Any]], shot: bytes, *, expected_images: int) -> None:
    """Every image decoded, and the screenshot is a page with pictures on it."""
    from PIL import Image

    assert len(images) == expected_images
    broken = [i["alt"] for i in images if not (i["complete"] and i["decoded"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, f"broken images: {broken}"
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.int16)
    assert pixels.shape[0] > 1500 and pixels.shape[1] == 1400  # the whole page, not one blank viewport
    not_white = (pixels.min(axis=2) < 235).mean()
    assert not_white > 0.03, f"screenshot nearly blank ({not_white:.1%} not white)"
    # The confusion matrix's dark blue cells (matplotlib's Blues), which only a drawn picture has.
    blue = (pixels[..., 2] - pixels[..., 0] > 60) & (pixels[..., 2] > 90)
    assert blue.sum() > 500, "no confusion-matrix picture visible"


def test_the_checks_catch_broken_images(chromium: Chromium, tmp_path: Path) -> None:
    """The checks fail on damaged data: URIs (so their passing means something)."""
    evaluation = _synthetic(4)
    png = ev.draw_confusion(evaluation=evaluation, title="t")
    truncated = ev.render_report(evaluation=evaluation, pictures=ev.Pictures(curves=png[:200], confusion=png),
                                 history=_history(), metrics={}, spec={})
    with pytest.raises(OSError, match="truncated"):
        _check_self_contained(truncated)
    garbage = truncated.replace(base64.b64encode(png[:200]).decode(), "AAAAAAAA")
    (tmp_path / "broken.html").write_text(garbage, encoding="utf-8")
    images, shot = chromium.open(tmp_path / "broken.html")
    assert [(i["decoded"], i["width"] > 0) for i in images] == [(False, False), (True, True)]
    with pytest.raises(AssertionError, match="broken images"):
        _assert_shows(images, shot, expected_images=2)


def _spec_file(tmp_path: Path, *, classes: tuple[str, ...], per_class: int = 8) -> tuple[Path, Path]:
    """A FineTuneJob manifest for a 1+1-epoch run on tiny generated images; returns it and the output dir."""
    data = tmp_path / "data"
    write_image_folder(data / "train", per_class=per_class, seed=1, classes=classes)
    write_image_folder(data / "val", per_class=max(2, per_class // 2), seed=2, classes=classes)
    out = tmp_path / "model"
    spec = spec_dict(train=data / "train", validation=data / "val", output=out, head_epochs=1, fine_epochs=1)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                      "metadata": {"name": "t"}, "spec": spec}), encoding="utf-8")
    return config, out


def _train(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, Any]]:
    """finetune-train's main() in-process; its exit code and termination message."""
    termination = tmp_path / "termination.json"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(termination))
    monkeypatch.delenv("FINETUNE_PROGRESS_URL", raising=False)
    monkeypatch.delenv("FINETUNE_METRICS_PORT", raising=False)
    code = main(["--config", str(config)])
    return code, json.loads(termination.read_text(encoding="utf-8"))


CLASSES = ("circle", "square", "stripes$1")  # a `$` as a class name's character


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    tmp_path = tmp_path_factory.mktemp("report-run")
    config, out = _spec_file(tmp_path, classes=CLASSES)
    with pytest.MonkeyPatch.context() as monkeypatch:
        code, _ = _train(config, tmp_path, monkeypatch)
    return code, out


def test_training_writes_the_evaluation_into_metrics_json(trained: tuple[int, Path]) -> None:
    code, out = trained
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    classes = json.loads((out / "classes.json").read_text(encoding="utf-8"))
    evaluation = metrics["evaluation"]
    matrix = np.asarray(evaluation["confusionMatrix"])
    assert matrix.shape == (len(classes), len(classes)) and matrix.sum() == metrics["images"]["validation"]
    assert [c["class"] for c in evaluation["perClass"]] == classes  # classes.json order
    assert [c["support"] for c in evaluation["perClass"]] == matrix.sum(axis=1).tolist() == [4, 4, 4]
    # The same final model as metrics.json's own final validation accuracy.
    assert evaluation["accuracy"] == pytest.approx(metrics["final"]["val_accuracy"], abs=1e-6)
    assert evaluation["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-6)
    report = metrics["report"]
    assert 0 < report.pop("seconds") < 120
    assert report == {"written": True, "path": str(out / "report.html"), "error": None,
                      "tensorboardImage": True, "tensorboardError": None}
    for key in ("classes", "final", "best", "stages", "epochsRun", "images", "durationSeconds", "modelPath"):
        assert key in metrics  # the keys metrics.json had before stay


def test_the_confusion_matrix_goes_to_tensorboard(trained: tuple[int, Path]) -> None:
    import tensorflow as tf

    _, out = trained
    files = list((out / "tensorboard" / ev.TENSORBOARD_RUN).glob("events.out.tfevents.*"))
    assert len(files) == 1
    images = []
    for event in tf.compat.v1.train.summary_iterator(str(files[0])):
        for value in event.summary.value:
            if value.tag == ev.TENSORBOARD_TAG and value.metadata.plugin_data.plugin_name == "images":
                images.append(tf.make_ndarray(value.tensor))
    assert len(images) == 1
    width, height, png = images[0][:3]  # the image plugin's [width, height, encoded image...]
    assert int(width) > 200 and int(height) > 200 and png.startswith(b"\x89PNG")


def test_the_report_has_every_section_and_opens_in_chromium(trained: tuple[int, Path], chromium: Chromium) -> None:
    _, out = trained
    page = (out / "report.html").read_text(encoding="utf-8")
    ids = [attrs.get("id") for tag, attrs in _tags(page) if tag == "section"]
    assert ids == ["summary", "curves", "confusion", "per-class", "most-confused", "timings", "spec"]
    pngs = _check_self_contained(page)
    assert len(pngs) == 2
    assert "stripes$1" in page and "fine-tune" in page and "images/s" in page
    assert "&quot;unfreezeLast&quot;: 4" in page  # the spec, as users type it
    images, shot = chromium.open(out / "report.html")
    _assert_shows(images, shot, expected_images=2)
    (out / "report-screenshot.png").write_bytes(shot)


def test_many_classes_report_opens_readable(chromium: Chromium, tmp_path: Path) -> None:
    n = 45
    y_true, y_pred = _synthetic_labels(n)
    names = [f"{HOSTILE} {i}" if i == 3 else f"class {i:03d}" for i in range(n)]
    keys = ev.evaluate_and_report(
        out=tmp_path, y_true=y_true, y_pred=y_pred, class_names=names, history=_history(),
        metrics={"stages": {"head": {"learningRate": 1e-3}, "fine-tune": {"learningRate": 1e-5}}},
        spec={"model": {"base": "EfficientNetB0"}},
    )
    assert keys["report"]["written"] and keys["report"]["tensorboardImage"]
    assert len(keys["evaluation"]["mostConfused"]) == ev.TOP_CONFUSIONS
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    pngs = _check_self_contained(page)
    assert len(pngs) == 3  # curves, the full matrix, the zoom on the most confused classes
    from PIL import Image

    sizes = [Image.open(io.BytesIO(png)).size for png in pngs]
    assert all(w <= 2000 and h <= 2000 for w, h in sizes), sizes
    assert "45 classes: the full matrix" in page and "after epoch 3 to 0.0005" in page
    images, shot = chromium.open(tmp_path / "report.html")
    _assert_shows(images, shot, expected_images=3)


def test_a_report_that_cannot_be_drawn_does_not_fail_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    def broken_savefig(self: Figure, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the PNG writer is broken\nsecond line")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    config, out = _spec_file(tmp_path, classes=CLASSES, per_class=6)
    stale = out / "report.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("an earlier run's report", encoding="utf-8")
    code, termination = _train(config, tmp_path, monkeypatch)
    assert code == 0 and termination["reason"] == "Succeeded"
    assert (out / "model.keras").exists()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["report"]["written"] is False and metrics["report"]["path"] is None
    assert metrics["report"]["error"] == "RuntimeError: the PNG writer is broken"
    assert metrics["report"]["tensorboardImage"] is False
    assert metrics["evaluation"]["confusionMatrix"] is not None  # the numbers do not need a picture
    assert not stale.exists()


def test_evaluation_errors_are_recorded_not_raised(tmp_path: Path) -> None:
    keys = ev.evaluate_and_report(out=tmp_path, y_true=[0, 5], y_pred=[0, 0], class_names=["a"], history=[],
                                  metrics={}, spec={})
    assert keys["evaluation"] is None
    assert keys["report"]["written"] is False
    assert keys["report"]["error"].startswith("evaluation: ValueError: y_true holds a label")
    assert not (tmp_path / "report.html").exists()


def test_no_epochs_and_no_misclassification_still_draw(tmp_path: Path) -> None:
    keys = ev.evaluate_and_report(out=tmp_path, y_true=[0, 1], y_pred=[0, 1], class_names=["a", "b"], history=[],
                                  metrics={"stages": {}}, spec={})
    assert keys["report"]["written"], keys["report"]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "No validation image was misclassified" in page and len(_check_self_contained(page)) == 2
