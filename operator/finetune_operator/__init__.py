"""finetune_operator: a Kopf operator that runs FineTuneJobs as batch/v1 Jobs."""

__version__ = "0.1.0"
