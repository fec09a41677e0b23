"""The progress token check: reading a JWT, verifying its signature locally, the review limit.

The real TokenReview, discovery and JWKS need a real API server:
tests/integration/test_progress_endpoint.py checks them there (including 2,000 forged tokens
costing no review). Here the pure parts run against keys the test makes, and `FakeApi` stands
in for the API server where a test must control what it answers (a key rotation, a JWKS it
may not read, a slow TokenReview), which the shared local control plane cannot be made to do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from finetune_contract import protocol
from finetune_operator import kube, metrics, tokens

ISSUER = "https://kubernetes.default.svc.cluster.local"
UID = "uid-a"
AUDIENCE = protocol.progress_audience(UID)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return b64url(json.dumps(obj).encode())

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def _review(*, authenticated: bool = True, username: str = "system:serviceaccount:ml:default",
            extra: dict[str, list[str]] | None = None) -> dict[str, Any]:
    user = {"username": username, "extra": extra if extra is not None else {
        tokens.POD_NAME_EXTRA: ["flowers-abc12"], tokens.POD_UID_EXTRA: ["pod-uid"]}}
    return {"status": {"authenticated": authenticated, "user": user if authenticated else {}, "error": "expired"}}


@dataclass
class Signer:
    """A signing key and its public JWK, as a cluster's service-account issuer has them."""

    private: Any
    kid: str
    alg: str

    @classmethod
    def rsa(cls, kid: str) -> Signer:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid, "RS256")

    @classmethod
    def ec(cls, kid: str) -> Signer:
        return cls(ec.generate_private_key(ec.SECP256R1()), kid, "ES256")

    def jwk(self) -> dict[str, Any]:
        if self.alg == "RS256":
            public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        else:
            # RFC 7518 6.2.1.2: an EC coordinate is the full width of the curve, leading zeros kept,
            # as the API server's JWKS writes it. PyJWT 2.9's to_jwk drops them (one key in 128).
            numbers = self.private.public_key().public_numbers()
            public = {"kty": "EC", "crv": "P-256", "x": b64url(numbers.x.to_bytes(32, "big")),
                      "y": b64url(numbers.y.to_bytes(32, "big"))}  # fmt: skip
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def token(self, *, kid: str | None = "same", **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": [AUDIENCE], "sub": "system:serviceaccount:ml:default",
                  "iat": now, "nbf": now, "exp": now + 600, **overrides}  # fmt: skip
        headers = {} if kid is None else {"kid": self.kid if kid == "same" else kid}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=headers)


@pytest.fixture(scope="module")
def issuer() -> Signer:
    return Signer.rsa("cluster-key-1")


@pytest.fixture(scope="module")
def forger() -> Signer:
    return Signer.rsa("forger")


def keyset(*signers: Signer) -> dict[str, jwt.PyJWK]:
    return {s.kid: jwt.PyJWK(s.jwk()) for s in signers}


@dataclass
class FakeApi:
    """Serves discovery and JWKS, answers TokenReviews (accepted, bound to a pod of job UID)."""

    signers: list[Signer]
    jwks_status: int = 200
    review_delay_s: float = 0.0
    gets: list[str] = field(default_factory=list)
    reviews: int = 0
    in_flight: int = 0
    peak: int = 0

    async def get(self, path: str) -> dict[str, Any]:
        self.gets.append(path)
        if path in (tokens.DISCOVERY_PATH, tokens.JWKS_PATH) and self.jwks_status != 200:
            raise kube.ApiError(status=self.jwks_status, method="GET", path=path, body={"reason": "Forbidden"})
        if path == tokens.DISCOVERY_PATH:
            return {"issuer": ISSUER, "jwks_uri": f"{ISSUER}{tokens.JWKS_PATH}"}
        if path == tokens.JWKS_PATH:
            return {"keys": [s.jwk() for s in self.signers]}
        if "/pods/" in path:
            owner = {"kind": "Job", "name": "flowers", "uid": "job-uid", "controller": True}
            return {"metadata": {"uid": "pod-uid", "ownerReferences": [owner]}}
        if "/jobs/" in path:
            owner = {"kind": "FineTuneJob", "name": "a", "uid": UID, "controller": True}
            return {"metadata": {"uid": "job-uid", "ownerReferences": [owner]}}
        raise AssertionError(f"unexpected GET {path}")

    async def create(self, path: str, body: Any) -> dict[str, Any]:
        assert path.endswith("/tokenreviews")
        self.reviews += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.review_delay_s)
        finally:
            self.in_flight -= 1
        return _review()


def checker(api: FakeApi, **kwargs: Any) -> tokens.TokenChecker:
    return tokens.TokenChecker(client=api, **kwargs)  # type: ignore[arg-type]


def checks(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("finetune_progress_token_checks_total", {"result": result}) or 0.0


# ----- the pure parts -----


def test_unverified_claims_reads_a_jwt_payload_and_nothing_else() -> None:
    assert tokens.unverified_claims(_jwt({"aud": ["a"], "exp": 5})) == {"aud": ["a"], "exp": 5}
    assert tokens.unverified_claims("not-a-jwt") is None
    assert tokens.unverified_claims("a.%%%.c") is None
    assert tokens.unverified_claims("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c") is None


def test_bound_pod_of_a_pod_bound_service_account_token() -> None:
    assert tokens.bound_pod(_review(), namespace="ml") == ("flowers-abc12", "pod-uid")


def test_bound_pod_refusals() -> None:
    expired = tokens.bound_pod(_review(authenticated=False), namespace="ml")
    assert isinstance(expired, tokens.Verdict) and expired.result == "unauthorized" and "expired" in expired.message
    other_ns = tokens.bound_pod(_review(), namespace="team-b")
    assert isinstance(other_ns, tokens.Verdict) and other_ns.result == "forbidden"
    user = tokens.bound_pod(_review(username="alice"), namespace="ml")
    assert isinstance(user, tokens.Verdict) and user.result == "forbidden"
    unbound = tokens.bound_pod(_review(extra={}), namespace="ml")
    assert isinstance(unbound, tokens.Verdict) and unbound.message == "token is not bound to a pod"


def test_a_token_signed_by_the_issuer_verifies(issuer: Signer) -> None:
    claims = tokens.verify_signature(issuer.token(), keys=keyset(issuer), issuer=ISSUER, audience=AUDIENCE)
    assert isinstance(claims, dict) and claims["aud"] == [AUDIENCE]
    ec_signer = Signer.ec("ec-key")
    both = keyset(issuer, ec_signer)
    assert isinstance(tokens.verify_signature(ec_signer.token(), keys=both, issuer=ISSUER, audience=AUDIENCE), dict)
    # No kid: every key of the issuer is tried.
    assert isinstance(tokens.verify_signature(ec_signer.token(kid=None), keys=both, issuer=ISSUER, audience=AUDIENCE), dict)


def test_an_ec_key_whose_coordinate_has_a_leading_zero_byte_verifies() -> None:
    # One P-256 key in 128 has such a coordinate; the JWKS carries it at the curve's full width.
    signer = next(s for s in (Signer.ec("ec-zero") for _ in range(5000))
                  if min(s.private.public_key().public_numbers().x, s.private.public_key().public_numbers().y) < 2**248)
    assert all(len(base64.urlsafe_b64decode(signer.jwk()[c] + "==")) == 32 for c in ("x", "y"))
    claims = tokens.verify_signature(signer.token(), keys=keyset(signer), issuer=ISSUER, audience=AUDIENCE)
    assert isinstance(claims, dict) and claims["sub"] == "system:serviceaccount:ml:default"


@pytest.mark.parametrize(
    "case",
    ["forged-same-kid", "forged-own-kid", "expired", "not-yet", "other-issuer", "other-audience", "no-exp",
     "alg-none", "hs256-with-the-public-key", "garbage", "huge"],
)  # fmt: skip
def test_a_token_not_signed_by_the_issuer_or_not_valid_now_is_refused(
    case: str, issuer: Signer, forger: Signer
) -> None:
    now = int(time.time())
    public_pem = issuer.jwk()  # what an attacker can read: the public key
    made = {
        "forged-same-kid": lambda: forger.token(kid=issuer.kid),
        "forged-own-kid": lambda: forger.token(),
        "expired": lambda: issuer.token(exp=now - 3600, iat=now - 7200, nbf=now - 7200),
        "not-yet": lambda: issuer.token(nbf=now + 3600, iat=now + 3600, exp=now + 7200),
        "other-issuer": lambda: issuer.token(iss="https://elsewhere.example"),
        "other-audience": lambda: issuer.token(aud=["progress.finetune.dev/uid-b"]),
        "no-exp": lambda: jwt.encode({"iss": ISSUER, "aud": [AUDIENCE], "iat": now}, issuer.private,
                                     algorithm="RS256", headers={"kid": issuer.kid}),
        "alg-none": lambda: jwt.encode({"iss": ISSUER, "aud": [AUDIENCE], "iat": now, "exp": now + 600}, None,
                                       algorithm="none", headers={"kid": issuer.kid}),
        "hs256-with-the-public-key": lambda: _hs256(json.dumps(public_pem).encode(), kid=issuer.kid),
        "garbage": lambda: "eyJhbGciOiJSUzI1NiJ9.e30.AAAA",
        "huge": lambda: issuer.token(padding="x" * 20000),
    }[case]  # fmt: skip
    verdict = tokens.verify_signature(made(), keys=keyset(issuer), issuer=ISSUER, audience=AUDIENCE)
    assert isinstance(verdict, tokens.Verdict), f"{case} verified"
    assert verdict.result == "unauthorized" and verdict.message.startswith("invalid token")


def _hs256(secret: bytes, *, kid: str) -> str:
    """An HMAC token keyed with the issuer's public key (the classic algorithm confusion)."""
    import hashlib
    import hmac

    def part(obj: dict[str, Any]) -> str:
        return b64url(json.dumps(obj).encode())

    now = int(time.time())
    signing = f"{part({'alg': 'HS256', 'kid': kid})}.{part({'iss': ISSUER, 'aud': [AUDIENCE], 'iat': now, 'exp': now + 600})}"
    mac = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64url(mac)


# ----- the issuer's keys -----


async def test_unknown_key_ids_refresh_the_keys_at_most_once_per_interval(issuer: Signer, forger: Signer) -> None:
    api = FakeApi(signers=[issuer])
    now = [1000.0]
    keys = tokens.IssuerKeys(client=api, min_refresh_s=30.0, clock=lambda: now[0])  # type: ignore[arg-type]
    got = await keys.current(kid=issuer.kid)
    assert got is not None and set(got[1]) == {issuer.kid} and got[0] == ISSUER
    assert keys.fetches == 1
    for i in range(500):  # a flood of made-up key ids within one interval
        await keys.current(kid=f"made-up-{i}")
    assert keys.fetches == 1
    now[0] += 31.0
    for i in range(500):
        await keys.current(kid=f"made-up-again-{i}")
    assert keys.fetches == 2
    # A rotation: the new key is picked up on the first token that names it (after the interval).
    rotated = Signer.rsa("cluster-key-2")
    api.signers.append(rotated)
    now[0] += 31.0
    got = await keys.current(kid=rotated.kid)
    assert got is not None and rotated.kid in got[1] and keys.fetches == 3
    # A known key id fetches nothing until the keys are an hour old.
    now[0] += 600.0
    await keys.current(kid=issuer.kid)
    assert keys.fetches == 3
    now[0] += 3600.0
    await keys.current(kid=issuer.kid)
    assert keys.fetches == 4


async def test_concurrent_first_uses_fetch_once(issuer: Signer) -> None:
    api = FakeApi(signers=[issuer])
    keys = tokens.IssuerKeys(client=api)  # type: ignore[arg-type]
    got = await asyncio.gather(*(keys.current(kid=issuer.kid) for _ in range(50)))
    assert all(g is not None for g in got)
    assert keys.fetches == 1 and api.gets.count(tokens.JWKS_PATH) == 1


async def test_forbidden_keys_fall_back_to_reviews_and_warn_once(
    issuer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    api = FakeApi(signers=[issuer], jwks_status=403)
    now = [0.0]
    keys = tokens.IssuerKeys(client=api, min_refresh_s=30.0, clock=lambda: now[0])  # type: ignore[arg-type]
    check = checker(api, keys=keys, review_burst=1000)
    before = checks("unverified")
    with caplog.at_level(logging.DEBUG, logger="finetune_operator.tokens"):
        for i in range(5):
            verdict = await check(token=issuer.token(jti=str(i)), namespace="ml", name="a", uid=UID)
            assert verdict.ok  # the review decides
            now[0] += 31.0  # every check may try the keys again
    assert api.reviews == 5 and checks("unverified") - before == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "system:service-account-issuer-discovery" in warnings[0].getMessage()
    assert keys.fetches == 5
    # Bound later (RBAC fixed): signatures are verified from the next attempt on.
    api.jwks_status = 200
    forged = Signer.rsa(issuer.kid).token()
    assert (await check(token=forged, namespace="ml", name="a", uid=UID)).result == "unauthorized"
    assert api.reviews == 5


# ----- the checker -----


async def test_a_token_for_another_audience_is_refused_without_a_review() -> None:
    class NoClient:
        async def create(self, path: str, body: Any) -> dict[str, Any]:
            raise AssertionError("no TokenReview for a token that is not for this job")

        async def get(self, path: str) -> dict[str, Any]:
            raise AssertionError("no keys needed for a token that is not for this job")

    checker_ = tokens.TokenChecker(client=NoClient())  # type: ignore[arg-type]
    other_job = _jwt({"aud": ["progress.finetune.dev/uid-b"], "exp": 2**40})
    verdict = await checker_(token=other_job, namespace="ml", name="a", uid="uid-a")
    assert verdict.result == "forbidden"
    api_token = _jwt({"aud": ["https://kubernetes.default.svc"], "exp": 2**40})
    assert (await checker_(token=api_token, namespace="ml", name="a", uid="uid-a")).result == "unauthorized"
    assert (await checker_(token="random", namespace="ml", name="a", uid="uid-a")).result == "unauthorized"
    assert checker_.reviews == 0


async def test_forged_tokens_cost_no_review(issuer: Signer, forger: Signer) -> None:
    api = FakeApi(signers=[issuer])
    check = checker(api)
    before = checks("rejected")
    for i in range(300):
        kid = issuer.kid if i % 2 else f"made-up-{i}"
        verdict = await check(token=forger.token(kid=kid, jti=str(i)), namespace="ml", name="a", uid=UID)
        assert verdict.result == "unauthorized"
    assert api.reviews == 0 and check.reviews == 0
    assert checks("rejected") - before == 300
    assert api.gets.count(tokens.JWKS_PATH) == 1  # made-up key ids within the refresh interval
    # The issuer's own token still passes: one review, then the cached verdict.
    real = issuer.token()
    assert (await check(token=real, namespace="ml", name="a", uid=UID)).ok
    assert (await check(token=real, namespace="ml", name="a", uid=UID)).ok
    assert api.reviews == 1


async def test_reviews_are_rate_limited_with_retry_after(issuer: Signer) -> None:
    api = FakeApi(signers=[issuer])
    check = checker(api, review_rate_per_s=0.01, review_burst=5)
    verdicts = [await check(token=issuer.token(jti=str(i)), namespace="ml", name="a", uid=UID) for i in range(40)]
    assert [v.result for v in verdicts[:5]] == ["ok"] * 5
    assert {v.result for v in verdicts[5:]} == {"unavailable"}
    assert all((v.retry_after or 0) >= 1 for v in verdicts[5:])
    assert api.reviews == 5


async def test_reviews_run_at_most_max_reviews_at_once_and_once_per_token(issuer: Signer) -> None:
    api = FakeApi(signers=[issuer], review_delay_s=0.2)
    check = checker(api, max_reviews=3, review_burst=100)
    distinct = [issuer.token(jti=str(i)) for i in range(10)]
    verdicts = await asyncio.gather(*(check(token=t, namespace="ml", name="a", uid=UID) for t in distinct))
    assert sorted(v.result for v in verdicts) == ["ok"] * 3 + ["unavailable"] * 7
    assert api.reviews == 3 and api.peak == 3
    # One token sent many times at once is reviewed once.
    same = issuer.token(jti="same")
    await asyncio.sleep(0)
    verdicts = await asyncio.gather(*(check(token=same, namespace="ml", name="a", uid=UID) for _ in range(20)))
    assert all(v.ok for v in verdicts)
    assert api.reviews == 4


@dataclass
class JobSetApi(FakeApi):
    """A worker pod of a multi-worker job: pod -> child Job -> JobSet -> FineTuneJob `jobset_owner`."""

    jobset_owner: str = UID
    jobset_uid: str = "jobset-uid"

    async def get(self, path: str) -> dict[str, Any]:
        if "/pods/" in path:
            self.gets.append(path)
            owner = {"kind": "Job", "name": "flowers-worker-0", "uid": "job-uid", "controller": True}
            return {"metadata": {"uid": "pod-uid", "ownerReferences": [owner]}}
        if "/jobs/" in path:
            self.gets.append(path)
            owner = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "name": "flowers",
                     "uid": "jobset-uid", "controller": True}
            return {"metadata": {"uid": "job-uid", "ownerReferences": [owner]}}
        if "/jobsets/" in path:
            self.gets.append(path)
            owner = {"kind": "FineTuneJob", "name": "a", "uid": self.jobset_owner, "controller": True}
            return {"metadata": {"uid": self.jobset_uid, "ownerReferences": [owner]}}
        return await super().get(path)


async def test_a_worker_pod_of_the_jobs_jobset_may_report(issuer: Signer) -> None:
    api = JobSetApi(signers=[issuer])
    verdict = await checker(api)(token=issuer.token(), namespace="ml", name="a", uid=UID)
    assert verdict.ok, verdict
    assert any("/apis/jobset.x-k8s.io/v1alpha2/namespaces/ml/jobsets/flowers" in g for g in api.gets)


@pytest.mark.parametrize(
    ("jobset_owner", "jobset_uid"),
    [("another-ftj-uid", "jobset-uid"), (UID, "a-jobset-made-again")],
    ids=["jobset-of-another-job", "jobset-replaced"],
)
async def test_a_pod_of_someone_elses_jobset_may_not_report(issuer: Signer, jobset_owner: str, jobset_uid: str) -> None:
    api = JobSetApi(signers=[issuer], jobset_owner=jobset_owner, jobset_uid=jobset_uid)
    verdict = await checker(api)(token=issuer.token(), namespace="ml", name="a", uid=UID)
    assert verdict.result == "forbidden"
