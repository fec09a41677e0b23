"""A stand-in for `finetune-train` in the operator's integration tests (no TensorFlow).

The operator runs it through `--trainer-command`; the FineTuneJob's `runtime.env` says what
it does: FAKE_SLEEP seconds of "training", then FAKE_EXIT (0 by default) with a JSON
termination summary like the trainer's (FAKE_REASON, FAKE_MESSAGE). It checks that its
config file is the FineTuneJob manifest the operator mounted, exiting 2 if not.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml


def report(*, epoch: int, spec: dict[str, Any]) -> None:
    """One head-stage epoch-end progress report, as the real trainer sends it (FAKE_REPORT=1).

    The epochs are the spec's plan, as the real trainer's are: the operator refuses a report
    that does not fit the job's plan.
    """
    training = spec.get("training") or {}
    head = int((training.get("head") or {}).get("epochs", 20))
    fine = training.get("fineTune") or {}
    total = head + (int(fine.get("epochs", 10)) if int(fine.get("unfreezeLast", 4)) > 0 else 0)
    body = {
        "namespace": os.environ["FINETUNE_JOB_NAMESPACE"],
        "name": os.environ["FINETUNE_JOB_NAME"],
        "uid": os.environ.get("FINETUNE_JOB_UID", ""),
        "event": "epoch-end",
        "stage": "head",
        "epoch": min(epoch, head),
        "stageEpochs": head,
        "epochsDone": min(epoch, head),
        "totalEpochs": total,
        "metrics": {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.75},
        "bestValAccuracy": 0.75,
        "timestamp": time.time(),
    }
    # The projected ServiceAccount token the kubelet (here: the pod runner) wrote for this pod.
    token = Path(os.environ["FINETUNE_PROGRESS_TOKEN_FILE"]).read_text(encoding="utf-8").strip()
    request = urllib.request.Request(
        os.environ["FINETUNE_PROGRESS_URL"],
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        print(f"progress report: HTTP {answer.status}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--config":
        print(f"usage: fake_trainer --config FILE (got {argv})", file=sys.stderr)
        return 2
    document = yaml.safe_load(Path(argv[1]).read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("kind") != "FineTuneJob" or "spec" not in document:
        print("config is not a FineTuneJob manifest", file=sys.stderr)
        return 2
    if os.environ.get("FAKE_REPORT"):
        report(epoch=1, spec=document["spec"])
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    code = int(os.environ.get("FAKE_EXIT", "0"))
    reason = os.environ.get("FAKE_REASON", "Succeeded" if code == 0 else "Error")
    message = os.environ.get("FAKE_MESSAGE", "done" if code == 0 else f"failed with {code}")
    summary = {"exitCode": code, "reason": reason, "message": message, "metrics": {}, "modelPath": None}
    if code == 0:
        summary["modelPath"] = "/models/fake/model.keras"
    target = Path(os.environ.get("FINETUNE_TERMINATION_LOG", "/dev/termination-log"))
    if target.parent.exists():
        with contextlib.suppress(OSError):
            target.write_text(json.dumps(summary), encoding="utf-8")
    print(message, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
