"""Checking a trainer's progress token: a projected ServiceAccount token, bound to its pod.

Each trainer pod mounts a ServiceAccount token whose audience is unique to its FineTuneJob
(`protocol.progress_audience(uid)`, see `builders`). `TokenChecker` decides whether a token
may write the progress of the job a report names:

1. a cheap look at the token's (unverified) claims: a token whose audience is another job's
   is refused with 403, anything that is not a token for this job with 401, and neither
   costs the API server a request;
2. the signature, locally (`IssuerKeys`): the token must be signed by one of the cluster's
   service-account issuer keys (the API server's OIDC discovery document and JWKS, fetched
   with the operator's own credentials, cached), for this job's audience, from the cluster's
   issuer, not expired. A forged token (well formed, the right audience, any other key) is
   refused with 401 here and costs the API server nothing. When the keys cannot be fetched
   (no RBAC for them, an old cluster) this step is skipped, logged once, and every token goes
   on to the review under its rate limit;
3. a TokenReview with the job's audience: the API server checks the token again and that the
   pod it is bound to still exists (401 otherwise). Reviews are rate-limited for the whole
   process (a token bucket, `review_rate_per_s` and `review_burst`, and at most
   `max_reviews` at once): over the limit the answer is `unavailable` with a Retry-After,
   never a review;
4. the token must be bound to a pod of this namespace, and that pod must be owned by the
   batch Job that this FineTuneJob (this uid) owns, or, for a multi-worker job, by a child
   Job of the JobSet this FineTuneJob owns (403 otherwise). So a pod a user makes by hand
   with a projected token for someone else's job's audience writes nothing.

A reviewed verdict is kept (by the token's SHA-256): an accepted token for at most `ttl_s`
and never past its own expiry, a refused one for `negative_ttl_s`; a token already under
review is not reviewed twice at once. A running trainer therefore costs one review and two
reads per `ttl_s` (300 s by default) and per token rotation, not one per report: a pod that
reports for an hour is reviewed about twelve times. Local refusals are not kept (checking a
signature again is cheaper than letting a flood of them evict the verdicts of real tokens).
Each review is counted in `finetune_progress_token_reviews_total{result}`, each token check
before it in `finetune_progress_token_checks_total{result}` (verified, rejected, unverified,
throttled).

The checker and the keys are I/O (a `kube.KubeClient`); `unverified_claims`, `bound_pod` and
`verify_signature` are pure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from finetune_contract import protocol

from finetune_operator import builders, kube, metrics

__all__ = [
    "DISCOVERY_PATH",
    "JWKS_PATH",
    "POD_NAME_EXTRA",
    "POD_UID_EXTRA",
    "IssuerKeys",
    "TokenChecker",
    "Verdict",
    "bound_pod",
    "unverified_claims",
    "verify_signature",
]

logger = logging.getLogger(__name__)

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"
_MAX_CACHED = 8192
_MAX_KEYS = 64  # keys of a JWKS that are kept (a cluster has a handful)
_MAX_TOKEN_CHARS = 16384


@dataclass(frozen=True)
class Verdict:
    """Whether a token may write a job's progress; `result` is a `finetune_progress_reports_total` result.

    `unavailable`: the token could not be checked now (the review limit); try again after
    `retry_after` seconds.
    """

    result: Literal["ok", "unauthorized", "forbidden", "unavailable"]
    message: str = ""
    retry_after: float | None = None

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


def verify_signature(
    token: str,
    *,
    keys: Mapping[str, jwt.PyJWK],
    issuer: str,
    audience: str,
    leeway_s: float = 30.0,
) -> dict[str, Any] | Verdict:
    """The verified claims of a ServiceAccount token, or why it is refused (401) (pure).

    `keys` are the issuer's public keys by key id (the JWKS); the token's `kid` picks one (a
    token without one is tried against each). Done with PyJWT rather than by hand: it pins the
    algorithm to the key's own (`algorithms=[key.algorithm_name]`, so no `alg: none` or
    HMAC-with-a-public-key confusion), verifies RSA and EC signatures with `cryptography`, and
    checks `exp`, `nbf`, `iat`, `aud` and `iss` with a leeway for the clocks of the API server
    and the operator: the checks a TokenReview would make on the signature, none of them
    re-implemented here.
    """
    if len(token) > _MAX_TOKEN_CHARS:
        return Verdict("unauthorized", "invalid token: too long")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        return Verdict("unauthorized", f"invalid token: {exc}")
    kid = header.get("kid")
    kid = kid if isinstance(kid, str) and kid else None
    candidates = list(keys.values()) if kid is None else [keys[kid]] if kid in keys else []
    if not candidates:
        return Verdict("unauthorized", "invalid token: not signed by a key of the cluster's issuer")
    why = "invalid token"
    for key in candidates:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                audience=audience,
                issuer=issuer,
                leeway=leeway_s,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            why = f"invalid token: {exc}"
            continue
        return claims
    return Verdict("unauthorized", why)


class IssuerKeys:
    """The cluster's service-account issuer and its public keys, from the API server.

    `/.well-known/openid-configuration` gives the issuer, `/openid/v1/jwks` the keys (the API
    server serves both to those bound to the `system:service-account-issuer-discovery`
    ClusterRole; deploy/base/rbac.yaml binds it to the operator). Fetched on first use with the
    operator's `KubeClient`, kept for `max_age_s`, fetched again early when a token names a key
    id the set lacks (a key rotation), but never more often than once per `min_refresh_s`: a
    flood of tokens with made-up key ids costs at most one fetch per `min_refresh_s`.

    `current(kid)` returns (issuer, keys), or None while no keys could be fetched ever; a
    failed fetch keeps the keys it had.
    """

    def __init__(
        self,
        *,
        client: kube.KubeClient,
        min_refresh_s: float = 30.0,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._min_refresh = float(min_refresh_s)
        self._max_age = float(max_age_s)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._issuer = ""
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf  # last successful fetch
        self._tried_at = -math.inf  # last attempt
        self._warned = False
        self.fetches = 0  # attempts, for tests

    async def current(self, *, kid: str | None) -> tuple[str, dict[str, jwt.PyJWK]] | None:
        if self._wants_fetch(kid):
            async with self._lock:
                if self._wants_fetch(kid):  # not fetched by whoever held the lock before
                    await self._fetch()
        if not self._keys:
            return None
        return self._issuer, self._keys

    def _wants_fetch(self, kid: str | None) -> bool:
        now = self._clock()
        if now - self._tried_at < self._min_refresh:
            return False
        stale = now - self._fetched_at >= self._max_age
        return stale or not self._keys or (kid is not None and kid not in self._keys)

    async def _fetch(self) -> None:
        self._tried_at = self._clock()
        self.fetches += 1
        try:
            discovery = await self._client.get(DISCOVERY_PATH)
            issuer = discovery.get("issuer")
            if not isinstance(issuer, str) or not issuer:
                raise ValueError(f"{DISCOVERY_PATH} names no issuer")
            keyset = jwt.PyJWKSet.from_dict(await self._client.get(JWKS_PATH))
            # The API server names every key (kid); one without a name could never be picked.
            keys = {k.key_id: k for k in keyset.keys if isinstance(k.key_id, str) and k.key_id}
        except Exception as exc:
            if not self._keys and not self._warned:
                self._warned = True
                logger.warning(
                    "progress tokens are checked by TokenReview only (rate-limited): could not fetch "
                    "the service-account issuer keys (%s, %s): %s; bind the ClusterRole "
                    "system:service-account-issuer-discovery to the operator to verify them locally",
                    DISCOVERY_PATH,
                    JWKS_PATH,
                    exc,
                )
            else:
                logger.debug("fetching the service-account issuer keys failed", exc_info=True)
            return
        if not keys:
            return
        if not self._keys:
            logger.info("progress tokens: verifying signatures with %d key(s) of issuer %s", len(keys), issuer)
        self._issuer, self._keys = issuer, dict(list(keys.items())[:_MAX_KEYS])
        self._fetched_at = self._tried_at


def _header_kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    return kid if isinstance(kid, str) and kid else None


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
        review_rate_per_s: float = 10.0,
        review_burst: int = 20,
        leeway_s: float = 30.0,
        keys: IssuerKeys | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._ttl = float(ttl_s)
        self._negative_ttl = float(negative_ttl_s)
        self._max_reviews = int(max_reviews)
        self._rate = float(review_rate_per_s)
        self._burst = float(review_burst)
        self._leeway = float(leeway_s)
        self._keys = keys if keys is not None else IssuerKeys(client=client)
        self._clock = clock
        self._monotonic = monotonic
        self._bucket = self._burst
        self._refilled_at = monotonic()
        self._in_flight: dict[tuple[bytes, str, str, str], asyncio.Task[Verdict]] = {}
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

        issuer_keys = await self._keys.current(kid=_header_kid(token))
        if issuer_keys is None:
            metrics.token_check(result="unverified")
        else:
            issuer, keys = issuer_keys
            verified = verify_signature(token, keys=keys, issuer=issuer, audience=audience, leeway_s=self._leeway)
            if isinstance(verified, Verdict):
                metrics.token_check(result="rejected")
                return verified
            metrics.token_check(result="verified")
            claims = verified

        running = self._in_flight.get(key)
        if running is None:
            refusal = self._admit()
            if refusal is not None:
                metrics.token_check(result="throttled")
                return refusal
            running = asyncio.get_running_loop().create_task(
                self._review(key=key, token=token, namespace=namespace, audience=audience, claims=claims)
            )
            self._in_flight[key] = running
            running.add_done_callback(lambda done: self._reviewed(key, done))
        return await asyncio.shield(running)

    def _reviewed(self, key: tuple[bytes, str, str, str], done: asyncio.Task[Verdict]) -> None:
        self._in_flight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: the waiters (if any are left) see it too

    def _admit(self) -> Verdict | None:
        """Takes a review slot, or says when to come back (the bucket empty or every slot busy)."""
        now = self._monotonic()
        self._bucket = min(self._burst, self._bucket + (now - self._refilled_at) * self._rate)
        self._refilled_at = now
        if len(self._in_flight) >= self._max_reviews:
            return Verdict("unavailable", "too many token checks at once; try again", retry_after=1.0)
        if self._bucket < 1.0:
            wait = (1.0 - self._bucket) / self._rate if self._rate > 0 else 60.0
            return Verdict("unavailable", "too many new tokens; try again", retry_after=max(1.0, wait))
        self._bucket -= 1.0
        return None

    async def _review(
        self, *, key: tuple[bytes, str, str, str], token: str, namespace: str, audience: str, claims: Mapping[str, Any]
    ) -> Verdict:
        now = self._clock()
        try:
            verdict = await self._check(token=token, namespace=namespace, uid=key[3], audience=audience)
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
            job_meta = job.get("metadata") or {}
            if job_meta.get("uid") != owner.get("uid"):
                return Verdict("forbidden", "token's pod is not a trainer pod of this job")
            controller = _controller(job)
            if controller.get("kind") == "JobSet" and controller.get("apiVersion") == builders.JOBSET_API_VERSION:
                # A multi-worker job: the pod's Job is a child of the FineTuneJob's JobSet.
                jobset = await self._client.get(
                    f"/apis/{builders.JOBSET_API_VERSION}/namespaces/{namespace}/jobsets/{controller.get('name')}"
                )
                if (jobset.get("metadata") or {}).get("uid") != controller.get("uid"):
                    return Verdict("forbidden", "token's pod is not a trainer pod of this job")
                controller = _controller(jobset)
        except kube.ApiError as exc:
            if exc.status == 404:
                return Verdict("forbidden", "token's pod is not a trainer pod of this job")
            raise
        if controller.get("uid") != uid:
            return Verdict("forbidden", "token's pod is not a trainer pod of this job")
        return OK
