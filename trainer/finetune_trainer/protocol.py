"""Moved to `finetune_contract.protocol`; this name stays only until every importer has moved."""

from finetune_contract.protocol import *  # noqa: F403
from finetune_contract.protocol import __all__ as __all__
