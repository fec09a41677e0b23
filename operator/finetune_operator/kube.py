"""The operator's Kubernetes API client: the official `kubernetes` package's asyncio flavour.

Kopf watches; this sends creates, patches, reads and events with the same credentials
(`kopf.ConnectionInfo`, from the login handler), in the operator's own event loop: no
threads, no model deserialisation (bodies stay plain JSON dicts, sent through
`ApiClient.param_serialize` and `call_api`), one pooled connection set.

Why this client. One library serves the operator, the test bed and the tools: the
`kubernetes` package (37.x), which now carries the asyncio client formerly published as
`kubernetes_asyncio` as `kubernetes.aio` (kubernetes-client/python #2547, #2593), generated
from the same OpenAPI document as the sync client the tests, `hack/cluster.py`, the pod
runner's threads and the kubectl plugin use. Its transport is aiohttp, which Kopf already
brings; its config loaders (kubeconfig with exec and OIDC plugins and their refresh,
in-cluster projected tokens re-read from the file) are the ones `kopf.login_via_client`
calls. The alternatives: kr8s (0.20) brings httpx and anyio next to Kopf's aiohttp, a second
HTTP stack in one process, and its own object model; Kopf's own request helpers are private
(`kopf._cogs.clients`) though they retry 429s since kopf #1229, and its
`login_with_kubeconfig` knows no exec or OIDC users. What the library lacks, this module
adds: its own Retry-After retries cover GET and HEAD only (client-go's rule,
`client_go_retries`), and it has no re-login after a 401 for a static token.

Retries. A 429 or a 500/502/503/504 answer is retried, for every method, up to
`RetryPolicy.attempts` attempts: after a capped exponential backoff with jitter, or after the
server's Retry-After when that is longer. A Retry-After beyond `max_retry_after_s` is not
waited for: the error reaches the caller at once (the reconcile engine retries later, and a
worker is not held for minutes). Retrying writes is safe here: a 429 was not processed, a
create retried after a 5xx that did land answers 409, which the actions adopt, and merge
patches are idempotent. 404, 409, 422 and the rest reach the caller as `ApiError` at once.

Credentials change while the operator runs (a projected ServiceAccount token is rotated by
the kubelet; a revoked one starts answering 401):

- `connect` (the login handler calls it on every Kopf login and re-login) swaps to the new
  credentials. The previous `ApiClient`, and its aiohttp session's sockets, is closed as
  soon as its last request in flight ends: there is never more than one open session, plus
  one draining, however often Kopf re-logs in.
- A 401 on a request of this client re-reads the credentials itself, with the `relogin`
  callable given to `connect` (the same login function Kopf calls, so a rotated token file
  is read again), and retries that request once with them. Concurrent 401s share one
  re-login; a re-login that yields the very same credentials is not repeated for
  `relogin_interval_s`, and the 401 then reaches the caller (the reconcile retries later).
  Kopf's own watches re-authenticate through Kopf's vault when they meet their own 401,
  which calls the login handler and so `connect` again (a no-op when the credentials are
  the ones this client already uses).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import kopf
from kubernetes.aio import client as kclient

__all__ = ["ApiError", "KubeClient", "Relogin", "RetryPolicy", "retry_delay", "same_credentials"]

logger = logging.getLogger("finetune_operator")

Relogin = Callable[[], Awaitable[kopf.ConnectionInfo | None]]
Sleep = Callable[[float], Awaitable[None]]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ApiError(Exception):
    """A non-2xx answer of the API server."""

    def __init__(
        self,
        *,
        status: int,
        method: str,
        path: str,
        body: Mapping[str, Any],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = dict(body)
        self.headers = dict(headers or {})
        self.reason = str(body.get("reason") or "")
        self.message = str(body.get("message") or body)
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How 429 and 5xx answers are retried; `attempts` counts the first one."""

    attempts: int = 5
    base_s: float = 0.25
    cap_s: float = 8.0
    jitter: float = 0.2
    max_retry_after_s: float = 30.0


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The Retry-After header in seconds (delta-seconds, as the API server sends it), or None."""
    for key, value in headers.items():
        if key.lower() == "retry-after":
            text = str(value).strip()
            try:
                seconds = float(text)
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


def retry_delay(
    *, error: ApiError, attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random
) -> float | None:
    """Seconds to wait before attempt `attempt + 1` after `error` on attempt `attempt` (from 1),
    or None: not retried (another status, attempts spent, or a Retry-After too long to wait)."""
    if error.status not in RETRY_STATUSES or attempt >= policy.attempts:
        return None
    backoff = min(policy.cap_s, policy.base_s * 2.0 ** (attempt - 1))
    backoff += backoff * policy.jitter * rand()
    asked = retry_after_s(error.headers)
    if asked is None:
        return backoff
    if asked > policy.max_retry_after_s:
        return None
    return max(backoff, asked)


def same_credentials(a: kopf.ConnectionInfo, b: kopf.ConnectionInfo) -> bool:
    """Whether two logins would send the same requests (priority and expiration aside)."""
    return dataclasses.replace(a, priority=0, expiration=None) == dataclasses.replace(
        b, priority=0, expiration=None
    )


def _headers(info: kopf.ConnectionInfo, user_agent: str) -> dict[str, str]:
    headers = dict(info.as_http_headers())  # bearer token or basic auth (kopf >= 1.45)
    headers["User-Agent"] = user_agent
    return headers


def _api_client(info: kopf.ConnectionInfo, *, user_agent: str, pool_size: int) -> kclient.ApiClient:
    """The library's ApiClient for these credentials: TLS as Kopf's login made it (CA, client
    certificate, insecure), the token or basic auth as default headers."""
    cfg = kclient.Configuration(host=info.server.rstrip("/"))
    cfg.connection_pool_maxsize = pool_size
    # As Kopf's own requests go: straight to the API server unless Kopf's settings say
    # otherwise (`settings.networking.trust_env`, off by default: no HTTP(S)_PROXY or ~/.netrc
    # from the environment; aiohttp's proxy bypass knows no NO_PROXY CIDRs).
    cfg.client_session_kwargs = {"trust_env": info.trust_env}
    cfg.proxy = info.proxy_url
    api = kclient.ApiClient(cfg)
    # The session (made lazily, inside the loop) uses this context for its connector.
    api.rest_client.ssl_context = info.as_ssl_context()
    api.default_headers.update(_headers(info, user_agent))
    return api


async def _close(api: kclient.ApiClient) -> None:
    await api.close()  # type: ignore[no-untyped-call]


class KubeClient:
    """JSON requests to the API server; `connect` must be called (by the login handler) first."""

    def __init__(
        self,
        *,
        user_agent: str = "finetune-operator",
        pool_size: int = 32,
        relogin_interval_s: float = 1.0,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._user_agent = user_agent
        self._pool_size = pool_size
        self._relogin_interval_s = relogin_interval_s
        self._retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep
        self._clock = clock  # measures `relogin_interval_s` (tests pass a clock they advance)
        self._info: kopf.ConnectionInfo | None = None
        self._relogin: Relogin | None = None
        self._api: kclient.ApiClient | None = None
        self._in_flight: dict[kclient.ApiClient, int] = {}
        self._draining: set[kclient.ApiClient] = set()
        self._relogin_lock: asyncio.Lock | None = None
        self._last_relogin: tuple[float, kopf.ConnectionInfo] | None = None
        self.sessions_opened = 0  # for tests: ApiClients (each one aiohttp session) made over the client's life
        self.relogins = 0  # re-logins this client made itself, after a 401
        self.retries = 0  # requests sent again after a 429 or 5xx

    @property
    def info(self) -> kopf.ConnectionInfo | None:
        """The credentials in use."""
        return self._info

    @property
    def open_sessions(self) -> int:
        """Sessions not yet closed: the current one and those still draining."""
        return (1 if self._api is not None else 0) + len(self._draining)

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, over every session."""
        return sum(self._in_flight.values())

    async def connect(self, *, info: kopf.ConnectionInfo, relogin: Relogin | None = None) -> None:
        """Uses these credentials from now on; the previous session closes once its requests end.

        `relogin`, when given, is how the client gets fresh credentials after a 401 (kept
        until another is given). The new session is opened lazily, inside the loop.
        """
        if relogin is not None:
            self._relogin = relogin
        if self._info is not None and same_credentials(self._info, info):
            self._info = info
            return
        self._info = info
        old, self._api = self._api, None
        if old is not None:
            await self._retire(old)

    async def _retire(self, api: kclient.ApiClient) -> None:
        if self._in_flight.get(api, 0) > 0:
            self._draining.add(api)
            return
        self._draining.discard(api)
        self._in_flight.pop(api, None)
        await _close(api)

    def _ensure(self) -> tuple[kclient.ApiClient, kopf.ConnectionInfo]:
        if self._info is None:
            raise RuntimeError("KubeClient is not connected: no credentials yet")
        if self._api is None:
            self._api = _api_client(self._info, user_agent=self._user_agent, pool_size=self._pool_size)
            self.sessions_opened += 1
        return self._api, self._info

    async def close(self) -> None:
        """Closes every session (the operator's cleanup); a later request opens a new one."""
        clients = [*self._draining, *([self._api] if self._api is not None else [])]
        self._draining.clear()
        self._in_flight.clear()
        self._api = None
        for api in clients:
            await _close(api)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One API call: retried after 429/5xx (see RetryPolicy), re-authenticated once after a 401."""
        attempt = 1
        reauthenticated = False
        while True:
            api, info = self._ensure()
            try:
                return await self._send(api, method, path, body=body, content_type=content_type, params=params)
            except ApiError as exc:
                if exc.status == 401 and not reauthenticated:
                    reauthenticated = True
                    if await self._reauthenticate(failed=info):
                        continue
                    raise
                delay = retry_delay(error=exc, attempt=attempt, policy=self._retry)
                if delay is None:
                    raise
                logger.info(
                    "%s %s: %s; retry %d/%d in %.1f s",
                    method, path, exc.status, attempt, self._retry.attempts - 1, delay,
                )
                attempt += 1
                self.retries += 1
                await self._sleep(delay)

    async def _send(
        self,
        api: kclient.ApiClient,
        method: str,
        path: str,
        *,
        body: Any,
        content_type: str,
        params: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        self._in_flight[api] = self._in_flight.get(api, 0) + 1
        try:
            verb, url, headers, data, _ = await api.param_serialize(
                method=method,
                resource_path=path,
                query_params=list(params.items()) if params else None,
                header_params={"Content-Type": content_type, "Accept": "application/json, */*"},  # */*: the JWKS is application/jwk-set+json
                body=dict(body) if isinstance(body, Mapping) else body,
            )
            resp = await api.call_api(
                verb, url, header_params=headers, body=data,
                _request_timeout=aiohttp.ClientTimeout(total=30, sock_connect=10),
            )
            raw: bytes = await resp.read()  # type: ignore[no-untyped-call]
            text = raw.decode("utf-8", errors="replace")
            try:
                payload = json.loads(text) if text else {}
            except json.JSONDecodeError:
                payload = {"message": text[:500]}
            if resp.status >= 400:
                if not isinstance(payload, dict):
                    payload = {"message": text[:500]}
                raise ApiError(
                    status=resp.status, method=method, path=path, body=payload, headers=dict(resp.headers)
                )
            return payload if isinstance(payload, dict) else {"items": payload}
        finally:
            left = self._in_flight.get(api, 1) - 1
            if left > 0:
                self._in_flight[api] = left
            else:
                self._in_flight.pop(api, None)
                if api in self._draining:
                    self._draining.discard(api)
                    await _close(api)

    async def _reauthenticate(self, *, failed: kopf.ConnectionInfo) -> bool:
        """After a 401 with `failed`: True when other credentials are now in use (retry with them)."""
        if self._relogin_lock is None:
            self._relogin_lock = asyncio.Lock()
        async with self._relogin_lock:
            if self._info is not None and not same_credentials(self._info, failed):
                return True  # another request (or Kopf's login) has already swapped them
            if self._relogin is None:
                return False
            now = self._clock()
            last = self._last_relogin
            if (
                last is not None
                and now - last[0] < self._relogin_interval_s
                and same_credentials(last[1], failed)
            ):
                return False  # just re-read, still these: the file is not rotated yet
            try:
                fresh = await self._relogin()
            except Exception as exc:
                logger.warning("re-login after a 401 failed: %s", exc)
                return False
            self._last_relogin = (self._clock(), fresh if fresh is not None else failed)
            if fresh is None or same_credentials(fresh, failed):
                logger.warning("the API server refused the credentials (401) and no new ones are there yet")
                return False
            self.relogins += 1
            logger.info("re-logged in after a 401: new credentials in use")
            await self.connect(info=fresh)
            return True

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=body)

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body=body, content_type="application/merge-patch+json")
