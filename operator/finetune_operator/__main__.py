"""`finetune-operator` (= `python -m finetune_operator`): runs Kopf with the FineTuneJob handlers.

One replica by default (`standalone`). For two or more replicas, pass `--peering NAME` with
Kopf's peering CRDs installed (deploy/base/peering.yaml): each replica takes a random
priority unless `--priority` is given, the highest one works and the others pause until its
peering record expires (about a minute after it dies).
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Sequence

import kopf

from finetune_operator import settings

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    config = settings.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG if config.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not config.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    from finetune_operator import handlers  # registers the handlers with Kopf's default registry

    handlers.configure(config=config)
    priority = config.priority if config.priority is not None else random.randint(1, 1_000_000)
    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        standalone=config.peering is None,
        peering_name=config.peering,
        priority=priority,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
