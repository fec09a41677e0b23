"""What to train: the trainer's config file (a FineTuneJob manifest or its spec), read and validated.

The spec's models are the contract's (`finetune_contract.spec`), shared with the operator;
this module reads the file (YAML or JSON), drops the keys only the operator reads and
validates the rest, naming each bad field by its path.

Importing this module must stay cheap: it never imports TensorFlow or Keras.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from finetune_contract.spec import KIND, TrainerSpec, format_validation_error
from pydantic import ValidationError

__all__ = [
    "ConfigError",
    "load_config",
    "load_runtime",
    "parse_config",
]

# Keys of a FineTuneJob spec that only the operator reads; a local run ignores them.
OPERATOR_ONLY_KEYS = frozenset({"runtime", "suspend"})


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid (exit code 2)."""


def _spec_of(document: Any, *, source: str) -> dict[str, Any]:
    """The spec mapping of a whole FineTuneJob resource or of a bare spec."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a FineTuneJob manifest or its spec, got {type(document).__name__}")
    if "spec" in document and ("kind" in document or "apiVersion" in document or "metadata" in document):
        kind = document.get("kind", KIND)
        if kind != KIND:
            raise ConfigError(f"{source}: kind is {kind!r}, expected {KIND!r}")
        spec = document["spec"]
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: spec must be a mapping")
        return spec
    return document


def parse_config(document: Any, *, source: str = "config") -> TrainerSpec:
    """Validates a parsed manifest (whole resource or bare spec); operator-only keys are ignored."""
    spec = {k: v for k, v in _spec_of(document, source=source).items() if k not in OPERATOR_ONLY_KEYS}
    try:
        return TrainerSpec.model_validate(spec)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config: {format_validation_error(exc)}") from exc


def _json_or_none(text: str) -> Any:
    """The document when `text` is JSON (an object), else None: YAML is tried next."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _read_document(file: Path) -> Any:
    """The parsed manifest file, YAML or JSON."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config: {exc.strerror or exc}") from exc
    try:
        # JSON first (the operator hands the spec as JSON): YAML's reader refuses some
        # characters JSON carries, such as C1 control characters in an env value.
        document = _json_or_none(text) if file.suffix != ".json" else json.loads(text)
        if document is None:
            document = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{file}: not valid YAML or JSON: {str(exc).splitlines()[0]}") from exc
    return document


def load_config(*, path: str | Path) -> TrainerSpec:
    """Reads and validates a FineTuneJob manifest file, YAML or JSON."""
    file = Path(path)
    return parse_config(_read_document(file), source=str(file))


def load_runtime(*, path: str | Path) -> dict[str, Any]:
    """The manifest's spec.runtime mapping ({} when absent), for choosing a distribution strategy.

    The operator validates runtime; the trainer reads only its gpus and workers
    (finetune_trainer.distribute.plan checks their types).
    """
    file = Path(path)
    runtime = _spec_of(_read_document(file), source=str(file)).get("runtime")
    return dict(runtime) if isinstance(runtime, dict) else {}
