"""`finetune-operator` (= `python -m finetune_operator`): runs Kopf with the FineTuneJob handlers.

One replica by default (`standalone`). For two or more replicas, pass `--peering NAME` with
Kopf's peering CRDs installed (deploy/base/peering.yaml): each replica takes a random
priority unless `--priority` is given, the highest one works and the others pause until its
peering record expires (about a minute after it dies).

One object must never stop the operator for all the others: the API server stores JSON nested
up to 10,000 levels (k8s.io/apimachinery's maxDepth), and Kopf decodes each listed or watched
object with `json.loads`, which counts every level against Python's recursion limit (1,000 by
default); a RecursionError there would end the watch, and the operator, on every restart. So
`main` raises the limit above the API server's own depth before Kopf starts. The CRD bounds a
FineTuneJob's depth (about 15 levels) anyway; this covers objects stored under an older CRD,
which the operator then fails as InvalidSpec like any other.

Kopf's peering identity is the pod's name (POD_NAME, which deploy/base sets from the
downward API, or Kopf's own POD_ID), else user@host: never a passwd lookup alone. The image
runs as a uid that has no /etc/passwd entry (65532, or whatever uid an overlay or OpenShift
picks), and Kopf's own `getpass.getuser()` raises KeyError there before the operator starts.
"""

from __future__ import annotations

import datetime
import getpass
import logging
import os
import random
import socket
import sys
from collections.abc import Sequence

import kopf
from kopf._core.engines import peering  # Identity: not exported at kopf's top level

from finetune_operator import settings

__all__ = ["API_SERVER_MAX_DEPTH", "allow_api_server_nesting", "main", "own_identity"]

API_SERVER_MAX_DEPTH = 10_000  # k8s.io/apimachinery/pkg/util/json maxDepth; Go's encoding/json allows as many
_STACK_MARGIN = 5_000  # frames of asyncio, aiohttp, Kopf and handlers below and around a decode


def allow_api_server_nesting() -> int:
    """Raises Python's recursion limit so that any object the API server serves decodes; the new limit."""
    limit = max(sys.getrecursionlimit(), API_SERVER_MAX_DEPTH + _STACK_MARGIN)
    sys.setrecursionlimit(limit)
    return limit


def own_identity() -> str:
    """Kopf's peering identity (see the module docstring): the pod's name, else user@host/time/random."""
    pod = os.environ.get("POD_ID") or os.environ.get("POD_NAME")
    if pod:
        return pod
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no USER/LOGNAME and a uid without a passwd entry
        user = f"uid-{os.getuid()}"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
    return f"{user}@{socket.gethostname()}/{now}/{random.randbytes(2).hex()}"


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

    allow_api_server_nesting()
    priority = config.priority if config.priority is not None else random.randint(1, 1_000_000)
    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        standalone=config.peering is None,
        peering_name=config.peering,
        priority=priority,
        identity=peering.Identity(own_identity()),
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
        memo=handlers.make_memo(config=config),  # the startup handler makes the Operator in it
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
