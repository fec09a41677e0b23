"""Checking a trainer's progress token: a projected ServiceAccount token, bound to its pod.

Each trainer pod mounts a ServiceAccount token whose audience is unique to its FineTuneJob
(`protocol.progress_audience(uid)`, see `builders`). `TokenChecker` decides whether a token
may write the progress of the job a report names:

1. a cheap look at the token's (unverified) claims: a token whose audience is another job's
   is refused with 403, anything that is not a token for this job with 401, and neither
   costs the API server a request;
2. a TokenReview with the job's audience: the API server verifies the signature, expiry and
   audience, and that the pod the token is bound to still exists (401 otherwise);
3. the token must be bound to a pod of this namespace, and that pod must be owned by the
   batch Job that this FineTuneJob (this uid) owns (403 otherwise). So a pod a user makes
   by hand with a projected token for someone else's job's audience writes nothing.

A verdict is kept (by the token's SHA-256): an accepted token for at most `ttl_s` and never
past its own expiry, a refused one for `negative_ttl_s`; at most `max_reviews` reviews run at
once. A running trainer therefore costs one review and two reads per pod and token rotation,
not one per report. Each check that reaches the API server is counted in
`finetune_progress_token_reviews_total{result}`.

The checker is I/O (a `kube.KubeClient`); `unverified_claims` and `bound_pod` are pure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from finetune_trainer import protocol

from finetune_operator import kube, metrics

__all__ = ["POD_NAME_EXTRA", "POD_UID_EXTRA", "TokenChecker", "Verdict", "bound_pod", "unverified_claims"]

logger = logging.getLogger(__name__)

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
_MAX_CACHED = 8192


@dataclass(frozen=True)
class Verdict:
    """Whether a token may write a job's progress; `result` is a `finetune_progress_reports_total` result."""

    result: Literal["ok", "unauthorized", "forbidden"]
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.result == "ok"


OK = Verdict("ok")


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, without verifying anything (None when it is not one)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


def bound_pod(review: Mapping[str, Any], *, namespace: str) -> tuple[str, str] | Verdict:
    """(pod name, pod uid) a reviewed token is bound to, or why it may not write this namespace's jobs."""
    status = review.get("status") or {}
    if not status.get("authenticated"):
        why = str(status.get("error") or "token not authenticated")
        return Verdict("unauthorized", f"invalid token: {why}")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    prefix = f"system:serviceaccount:{namespace}:"
    if not username.startswith(prefix):
        return Verdict("forbidden", "token is not a ServiceAccount token of the job's namespace")
    extra = user.get("extra") or {}
    names, uids = extra.get(POD_NAME_EXTRA) or [], extra.get(POD_UID_EXTRA) or []
    if len(names) != 1 or len(uids) != 1:
        return Verdict("forbidden", "token is not bound to a pod")
    return str(names[0]), str(uids[0])


def _controller(body: Mapping[str, Any]) -> Mapping[str, Any]:
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return {}


class TokenChecker:
    """`await checker(token=..., namespace=..., name=..., uid=...)` -> a `Verdict` (see the module doc)."""

    def __init__(
        self,
        *,
        client: kube.KubeClient,
        ttl_s: float = 300.0,
        negative_ttl_s: float = 30.0,
        max_reviews: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._ttl = float(ttl_s)
        self._negative_ttl = float(negative_ttl_s)
        self._limit = asyncio.Semaphore(max_reviews)
        self._clock = clock
        self._cache: OrderedDict[tuple[bytes, str, str, str], tuple[float, Verdict]] = OrderedDict()
        self.reviews = 0  # TokenReviews sent, for benchmarks and tests

    async def __call__(self, *, token: str, namespace: str, name: str, uid: str) -> Verdict:
        key = (hashlib.sha256(token.encode()).digest(), namespace, name, uid)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        audience = protocol.progress_audience(uid)
        claims = unverified_claims(token) or {}
        audiences = _audiences(claims)
        if audience not in audiences:
            if any(a.startswith(protocol.PROGRESS_AUDIENCE_PREFIX) for a in audiences):
                return Verdict("forbidden", "token is not valid for this job")
            return Verdict("unauthorized", "invalid token")
        async with self._limit:
            try:
                verdict = await self._check(token=token, namespace=namespace, uid=uid, audience=audience)
            except Exception:
                metrics.token_review(result="error")
                raise
        metrics.token_review(result=verdict.result)
        if verdict.ok:
            expiry = claims.get("exp")
            until = now + self._ttl
            if isinstance(expiry, int | float):
                until = min(until, float(expiry))
        else:
            until = now + self._negative_ttl
        self._cache[key] = (until, verdict)
        self._cache.move_to_end(key)
        while len(self._cache) > _MAX_CACHED:
            self._cache.popitem(last=False)
        return verdict

    async def _check(self, *, token: str, namespace: str, uid: str, audience: str) -> Verdict:
        self.reviews += 1
        review = await self._client.create(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": [audience]},
            },
        )
        bound = bound_pod(review, namespace=namespace)
        if isinstance(bound, Verdict):
            return bound
        pod_name, pod_uid = bound
        try:
            pod = await self._client.get(f"/api/v1/namespaces/{namespace}/pods/{pod_name}")
            owner = _controller(pod)
            if (pod.get("metadata") or {}).get("uid") != pod_uid or owner.get("kind") != "Job":
                return Verdict("forbidden", "token's pod is not a trainer pod of this job")
            job = await self._client.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{owner.get('name')}")
        except kube.ApiError as exc:
            if exc.status == 404:
                return Verdict("forbidden", "token's pod is not a trainer pod of this job")
            raise
        job_meta = job.get("metadata") or {}
        if job_meta.get("uid") != owner.get("uid") or _controller(job).get("uid") != uid:
            return Verdict("forbidden", "token's pod is not a trainer pod of this job")
        return OK
