"""finetune_contract: what the operator and the trainer agree on, imported by both.

- `spec`: the FineTuneJob's API group, version and kind, and the typed models of the spec's
  training fields (the CRD's schema is rendered from them, the trainer validates its config
  with them);
- `protocol`: the progress reports a trainer POSTs to the operator, the environment the
  operator gives the trainer, the termination summary;
- `exits`: the trainer's exit codes and the status reasons they stand for.

Neither Kubernetes nor TensorFlow (nor Kopf or Keras) is imported here: only pydantic and the
standard library, so each side pays nothing for the other's dependencies.
"""

__version__ = "0.1.0"
