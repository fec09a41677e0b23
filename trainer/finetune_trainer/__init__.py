"""finetune_trainer: two-phase Keras fine-tuning of pretrained image models."""

__version__ = "0.1.0"
