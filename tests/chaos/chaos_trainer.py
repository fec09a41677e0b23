"""The trainer command of the chaos tier's operators: `python chaos_trainer.py --config FILE`.

Two modes, chosen by the FineTuneJob's `runtime.env`:

- `CHAOS_EXIT` set (hostile output, `test_chaos_runtime.py`): copies the file
  `CHAOS_MESSAGE` (a key of a mounted ConfigMap: arbitrary bytes, invalid UTF-8 included)
  to the termination-message path (or, with `CHAOS_TO=log`, to stderr only, for
  FallbackToLogsOnError) and exits with `CHAOS_EXIT` (0-255). Nothing else is imported.
- otherwise (pre-flight, `test_chaos_admission.py`): what the real `finetune-train` does
  before it imports TensorFlow, with the trainer's own code: `config.load_config` (exit 2,
  InvalidSpec), the checks of `model.build_base` that need no Keras (a weights file must be a
  file, 3 channels, and, as a copy of one third-party rule, `baseOptions` must be keyword
  arguments of `keras.applications.MobileNetV2`, the base the chaos manifests use: Keras
  raises TypeError otherwise, which the trainer turns into InvalidSpec), then
  `data.scan_folder` of the training (and validation) folder (exit 3, DataError); then it
  "trains" no further and exits 0. An unexpected exception exits 1 (Error), as in the real
  trainer. It never writes under the spec's paths.

Either way the termination summary has the trainer's JSON shape
(`protocol.TerminationSummary`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# keras.applications.MobileNetV2's keyword arguments, less those the trainer passes itself.
MOBILENET_V2_OPTIONS = frozenset({"alpha", "input_tensor", "pooling", "classes", "classifier_activation", "name"})
TERMINATION_LOG = Path(os.environ.get("FINETUNE_TERMINATION_LOG", "/dev/termination-log"))


def _write_termination(data: bytes) -> None:
    try:
        TERMINATION_LOG.write_bytes(data)
    except OSError as exc:
        print(f"chaos_trainer: cannot write {TERMINATION_LOG}: {exc}", file=sys.stderr)


def hostile_output() -> int:
    """Writes the chosen bytes where the kubelet reads the termination message; exits as told."""
    code = int(os.environ["CHAOS_EXIT"])
    source = os.environ.get("CHAOS_MESSAGE", "")
    data = Path(source).read_bytes() if source else b""
    if os.environ.get("CHAOS_TO") == "log":
        sys.stderr.buffer.write(data)
        sys.stderr.flush()
    else:
        _write_termination(data)
    return code


def _finish(*, code: int, reason: str, message: str) -> int:
    summary = {"exitCode": code, "reason": reason, "message": message[:3000], "metrics": {}, "modelPath": None}
    _write_termination(json.dumps(summary).encode())
    print(f"chaos_trainer: {reason}: {message[:300]}", file=sys.stderr)
    return code


def preflight(config_file: str) -> int:
    """The real trainer's checks before TensorFlow: the config, then the data folders."""
    from finetune_trainer import data
    from finetune_trainer.config import ConfigError, load_config
    from finetune_trainer.errors import DataError

    try:
        spec = load_config(path=config_file)
    except ConfigError as exc:
        return _finish(code=2, reason="InvalidSpec", message=str(exc))
    model = spec.model
    if model.weights.lower() not in ("imagenet", "none") and not Path(model.weights).is_file():
        return _finish(code=2, reason="InvalidSpec", message=f"spec.model.weights: {model.weights} is not a file")
    if model.input_shape[2] != 3:
        return _finish(code=2, reason="InvalidSpec", message="spec.model.inputShape: channels must be 3")
    unknown = sorted(set(model.base_options) - MOBILENET_V2_OPTIONS)
    if unknown:
        return _finish(code=2, reason="InvalidSpec", message=f"spec.model.baseOptions: unexpected {unknown[:5]}")
    try:
        data.scan_folder(root=spec.data.train, field_name="spec.data.train")
        if spec.data.validation is not None:
            data.scan_folder(root=spec.data.validation, field_name="spec.data.validation")
    except DataError as exc:
        return _finish(code=3, reason="DataError", message=str(exc))
    return _finish(code=0, reason="Succeeded", message="pre-flight passed (the chaos trainer trains nothing)")


def main(argv: list[str]) -> int:
    if "CHAOS_EXIT" in os.environ:
        return hostile_output()
    if len(argv) != 2 or argv[0] != "--config":
        return _finish(code=2, reason="InvalidSpec", message=f"usage: chaos_trainer --config FILE (got {argv!r})")
    try:
        return preflight(argv[1])
    except Exception as exc:  # the real trainer's catch-all: an unexpected error, retryable
        return _finish(code=1, reason="Error", message=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
