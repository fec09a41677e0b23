"""Projected ServiceAccount tokens: minted by TokenRequest, bound to the pod, renewed at 80 % of their lifetime as the kubelet does."""

from __future__ import annotations

import os
import time

from finetune_testbed.podrunner.common import Obj, log
from finetune_testbed.podrunner.environment import Environment
from finetune_testbed.podrunner.state import PodRun


class Tokens(Environment):
    """Projected ServiceAccount tokens: minted by TokenRequest, bound to the pod, renewed at 80 % of their lifetime as the kubelet does."""

    def token(self, pod: Obj, source: Obj) -> bytes:
        sa = pod["spec"].get("serviceAccountName") or "default"
        ns = pod["metadata"]["namespace"]
        spec: Obj = {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                               "uid": pod["metadata"]["uid"]},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        got = self.api.request(
            "POST",
            f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(got["status"]["token"]).encode()

    @staticmethod
    def renew_at(source: Obj) -> float:
        """When a projected token is minted again: at 80 % of its lifetime, like the kubelet."""
        return time.monotonic() + 0.8 * int(source.get("expirationSeconds", 3607))

    def renew_tokens(self, run: PodRun, now: float) -> None:
        """Mints the run's projected tokens again when due, replacing each file atomically."""
        for i, (path, source, due) in enumerate(run.tokens):
            if now < due:
                continue
            try:
                data = self.token(run.pod, source)
            except Exception as err:  # retried in a minute; the old token is still valid meanwhile
                log.warning("renewing the token of pod %s/%s: %s", run.namespace, run.name, err)
                run.tokens[i] = (path, source, now + 60.0)
                continue
            fresh = path.with_name(f".{path.name}.new")
            fresh.write_bytes(data)
            os.chmod(fresh, path.stat().st_mode & 0o777)
            fresh.replace(path)
            run.tokens[i] = (path, source, self.renew_at(source))
