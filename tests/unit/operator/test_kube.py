"""kube.KubeClient: when two logins are the same credentials, the headers it sends, and its
retries after 429 and 5xx answers (against a loopback aiohttp server: a transport test, not a
Kubernetes mock; 404/409/422 against the real API server run in the integration tests).

The session swapping, draining and the re-login after a 401 run against a real API server in
tests/integration/test_survival.py.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import time
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from aiohttp import web
from finetune_operator import kube


def test_same_credentials_ignores_priority_and_expiration_but_not_the_token() -> None:
    a = kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="t1", priority=10)
    later = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    assert kube.same_credentials(
        a, kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="t1", expiration=later)
    )
    assert not kube.same_credentials(a, kopf.ConnectionInfo(server="https://127.0.0.1:6443", token="t2"))
    assert not kube.same_credentials(a, kopf.ConnectionInfo(server="https://127.0.0.1:6444", token="t1"))


def test_headers_carry_the_token_or_basic_auth_and_the_user_agent() -> None:
    token = kube._headers(kopf.ConnectionInfo(server="https://h", token="abc"), "ua/1")
    assert token == {"Authorization": "Bearer abc", "User-Agent": "ua/1"}
    basic = kube._headers(kopf.ConnectionInfo(server="https://h", username="u", password="p"), "ua/1")
    assert basic["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


async def test_a_client_without_credentials_refuses_and_closes_cleanly() -> None:
    client = kube.KubeClient()
    with pytest.raises(RuntimeError, match="not connected"):
        await client.get("/version")
    await client.close()
    assert client.open_sessions == 0 and client.sessions_opened == 0


# ----- retries on 429 and 5xx: the client's transport against a loopback aiohttp server -----


class Answers:
    """A loopback HTTP server answering each request with the next (status, headers) in a script."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.seen: list[tuple[str, str, str]] = []
        self.runner: web.AppRunner | None = None

    async def answer(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs, await request.text()))
        status, headers = self.script[min(len(self.seen), len(self.script)) - 1]
        body = {"kind": "Status", "code": status, "reason": "Scripted", "message": f"answer {len(self.seen)}"}
        if status < 300:
            body = {"kind": "ConfigMap", "metadata": {"name": "x"}}
        return web.json_response(body, status=status, headers=headers)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.answer)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def recording_client(slept: list[float], **kwargs: Any) -> kube.KubeClient:
    async def sleep(seconds: float) -> None:  # records the wait instead of waiting it
        slept.append(seconds)

    return kube.KubeClient(sleep=sleep, **kwargs)


@contextlib.asynccontextmanager
async def connected(server: Answers, client: kube.KubeClient) -> AsyncIterator[None]:
    """`client` logged in to `server` while the block runs, closed after it (raised or not)."""
    async with server as url:
        await client.connect(info=kopf.ConnectionInfo(server=url, token="t"))
        try:
            yield
        finally:
            await client.close()


async def test_a_429_is_retried_after_the_servers_retry_after() -> None:
    server = Answers([(429, {"Retry-After": "2"}), (429, {"Retry-After": "2"}), (201, {})])
    slept: list[float] = []
    client = recording_client(slept)
    async with connected(server, client):
        got = await client.create("/api/v1/namespaces/n/configmaps", {"metadata": {"name": "x"}})
    assert got["metadata"] == {"name": "x"}
    assert slept == [2.0, 2.0]  # the server's ask, longer than the backoff (0.25 s, 0.5 s)
    assert [m for m, _, _ in server.seen] == ["POST"] * 3
    assert {b for _, _, b in server.seen} == {'{"metadata": {"name": "x"}}'}  # the same body each time
    assert client.retries == 2


async def test_5xx_backs_off_exponentially_and_gives_up_after_the_attempts() -> None:
    server = Answers([(503, {})])
    slept: list[float] = []
    policy = kube.RetryPolicy(attempts=4, base_s=0.5, cap_s=1.5, jitter=0.2)
    client = recording_client(slept, retry=policy)
    async with connected(server, client):
        with pytest.raises(kube.ApiError) as caught:
            await client.get("/api/v1/namespaces/n/configmaps/x?x=1")
    assert caught.value.status == 503 and caught.value.message == "answer 4"
    assert len(server.seen) == 4 and len(slept) == 3
    for wait, base in zip(slept, (0.5, 1.0, 1.5), strict=True):  # doubled, capped at 1.5, jittered up to 20 %
        assert base <= wait <= base * 1.2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_other_refusals_reach_the_caller_at_once(status: int) -> None:
    server = Answers([(status, {"Retry-After": "1"})])
    slept: list[float] = []
    client = recording_client(slept)
    async with connected(server, client):
        with pytest.raises(kube.ApiError) as caught:
            await client.merge_patch("/api/v1/namespaces/n/configmaps/x", {"data": {"a": "1"}})
    assert caught.value.status == status and caught.value.reason == "Scripted"
    assert len(server.seen) == 1 and slept == []


async def test_a_retry_after_too_long_to_wait_is_not_waited_for() -> None:
    server = Answers([(429, {"Retry-After": "120"}), (200, {})])
    slept: list[float] = []
    client = recording_client(slept, retry=kube.RetryPolicy(max_retry_after_s=30))
    async with connected(server, client):
        with pytest.raises(kube.ApiError) as caught:
            await client.get("/api/v1/namespaces/n/configmaps/x")
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "120"
    assert len(server.seen) == 1 and slept == []


async def test_a_real_wait_honours_retry_after() -> None:
    """Without an injected sleep: the second request comes no sooner than the server asked."""
    server = Answers([(503, {"Retry-After": "1"}), (200, {})])
    client = kube.KubeClient()
    async with connected(server, client):
        started = time.monotonic()
        await client.get("/api/v1/namespaces/n/configmaps/x")
    assert time.monotonic() - started >= 1.0
    assert len(server.seen) == 2


def test_retry_delay_is_pure_and_bounded() -> None:
    def error(status: int, **headers: str) -> kube.ApiError:
        return kube.ApiError(status=status, method="GET", path="/", body={}, headers=headers)

    policy = kube.RetryPolicy(attempts=3, base_s=1.0, cap_s=1.5, jitter=0.0)
    assert kube.retry_delay(error=error(500), attempt=1, policy=policy) == 1.0
    assert kube.retry_delay(error=error(502), attempt=2, policy=policy) == 1.5  # capped
    assert kube.retry_delay(error=error(502), attempt=3, policy=policy) is None  # attempts spent
    assert kube.retry_delay(error=error(429, **{"retry-after": "7"}), attempt=1, policy=policy) == 7.0
    assert kube.retry_delay(error=error(429, **{"Retry-After": "soon"}), attempt=1, policy=policy) == 1.0
    assert kube.retry_delay(error=error(501), attempt=1, policy=policy) is None  # not implemented: final
    assert kube.retry_delay(error=error(409), attempt=1, policy=policy) is None


async def test_requests_go_straight_to_the_server_whatever_the_proxy_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # the discard port: nothing answers there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    server = Answers([(200, {})])
    client = kube.KubeClient(retry=kube.RetryPolicy(attempts=1))
    async with connected(server, client):
        got = await client.get("/api/v1/namespaces/n/configmaps/x")
    assert got["metadata"] == {"name": "x"} and len(server.seen) == 1
