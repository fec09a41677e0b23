"""The pure parts of the progress token check: reading a JWT's claims and a TokenReview's answer.

The TokenReview itself needs a real API server: tests/integration/test_progress_endpoint.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from finetune_operator import tokens


def _jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def _review(*, authenticated: bool = True, username: str = "system:serviceaccount:ml:default",
            extra: dict[str, list[str]] | None = None) -> dict[str, Any]:
    user = {"username": username, "extra": extra if extra is not None else {
        tokens.POD_NAME_EXTRA: ["flowers-abc12"], tokens.POD_UID_EXTRA: ["pod-uid"]}}
    return {"status": {"authenticated": authenticated, "user": user if authenticated else {}, "error": "expired"}}


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


async def test_a_token_for_another_audience_is_refused_without_a_review() -> None:
    class NoClient:
        async def create(self, path: str, body: Any) -> dict[str, Any]:
            raise AssertionError("no TokenReview for a token that is not for this job")

    checker = tokens.TokenChecker(client=NoClient())  # type: ignore[arg-type]
    other_job = _jwt({"aud": ["progress.finetune.dev/uid-b"], "exp": 2**40})
    verdict = await checker(token=other_job, namespace="ml", name="a", uid="uid-a")
    assert verdict.result == "forbidden"
    api_token = _jwt({"aud": ["https://kubernetes.default.svc"], "exp": 2**40})
    assert (await checker(token=api_token, namespace="ml", name="a", uid="uid-a")).result == "unauthorized"
    assert (await checker(token="random", namespace="ml", name="a", uid="uid-a")).result == "unauthorized"
    assert checker.reviews == 0
