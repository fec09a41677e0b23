"""A small async Kubernetes API client on aiohttp, for the few writes the operator makes.

Kopf watches; this sends creates, patches, reads and events with the same credentials
(`kopf.ConnectionInfo`, from the login handler), in the operator's own event loop: no
threads, no model deserialisation, one pooled connection set.

Credentials change while the operator runs (a projected ServiceAccount token is rotated by
the kubelet; a revoked one starts answering 401):

- `connect` (the login handler calls it on every Kopf login and re-login) swaps to the new
  credentials. The previous aiohttp session, and its connector's sockets, is closed as soon
  as its last request in flight ends: there is never more than one open session, plus one
  draining, however often Kopf re-logs in.
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
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import kopf

__all__ = ["ApiError", "KubeClient", "Relogin", "same_credentials"]

logger = logging.getLogger("finetune_operator")

Relogin = Callable[[], Awaitable[kopf.ConnectionInfo | None]]


class ApiError(Exception):
    """A non-2xx answer of the API server."""

    def __init__(self, *, status: int, method: str, path: str, body: Mapping[str, Any]) -> None:
        self.status = status
        self.body = dict(body)
        self.reason = str(body.get("reason") or "")
        self.message = str(body.get("message") or body)
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")


def same_credentials(a: kopf.ConnectionInfo, b: kopf.ConnectionInfo) -> bool:
    """Whether two logins would send the same requests (priority and expiration aside)."""
    return dataclasses.replace(a, priority=0, expiration=None) == dataclasses.replace(
        b, priority=0, expiration=None
    )


def _headers(info: kopf.ConnectionInfo, user_agent: str) -> dict[str, str]:
    headers = dict(info.as_http_headers())  # bearer token or basic auth (kopf >= 1.45)
    headers["User-Agent"] = user_agent
    return headers


class KubeClient:
    """Raw JSON requests to the API server; `connect` must be called (by the login handler) first."""

    def __init__(
        self, *, user_agent: str = "finetune-operator", pool_size: int = 32, relogin_interval_s: float = 1.0
    ) -> None:
        self._user_agent = user_agent
        self._pool_size = pool_size
        self._relogin_interval_s = relogin_interval_s
        self._info: kopf.ConnectionInfo | None = None
        self._relogin: Relogin | None = None
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[aiohttp.ClientSession, int] = {}
        self._draining: set[aiohttp.ClientSession] = set()
        self._relogin_lock: asyncio.Lock | None = None
        self._last_relogin: tuple[float, kopf.ConnectionInfo] | None = None
        self.sessions_opened = 0  # for tests: aiohttp sessions made over the client's life
        self.relogins = 0  # re-logins this client made itself, after a 401

    @property
    def info(self) -> kopf.ConnectionInfo | None:
        """The credentials in use."""
        return self._info

    @property
    def open_sessions(self) -> int:
        """aiohttp sessions not yet closed: the current one and those still draining."""
        current = 1 if self._session is not None and not self._session.closed else 0
        return current + len(self._draining)

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
        old, self._session = self._session, None
        if old is not None:
            await self._retire(old)

    async def _retire(self, session: aiohttp.ClientSession) -> None:
        if self._in_flight.get(session, 0) > 0:
            self._draining.add(session)
            return
        self._draining.discard(session)
        self._in_flight.pop(session, None)
        await session.close()

    def _ensure(self) -> tuple[aiohttp.ClientSession, str, kopf.ConnectionInfo]:
        if self._info is None:
            raise RuntimeError("KubeClient is not connected: no credentials yet")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, ssl=self._info.as_ssl_context()),
                headers=_headers(self._info, self._user_agent),
                timeout=aiohttp.ClientTimeout(total=30, sock_connect=10),
            )
            self.sessions_opened += 1
        return self._session, self._info.server.rstrip("/"), self._info

    async def close(self) -> None:
        """Closes every session (the operator's cleanup); a later request opens a new one."""
        sessions = [*self._draining, *([self._session] if self._session is not None else [])]
        self._draining.clear()
        self._in_flight.clear()
        self._session = None
        for session in sessions:
            await session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        session, server, info = self._ensure()
        try:
            return await self._send(session, method, server, path, data=data, headers=headers, params=params)
        except ApiError as exc:
            if exc.status != 401 or not await self._reauthenticate(failed=info):
                raise
        session, server, _ = self._ensure()
        return await self._send(session, method, server, path, data=data, headers=headers, params=params)

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        server: str,
        path: str,
        *,
        data: str | None,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        self._in_flight[session] = self._in_flight.get(session, 0) + 1
        try:
            async with session.request(
                method, server + path, data=data, headers=headers, params=params
            ) as resp:
                text = await resp.text()
                try:
                    payload = json.loads(text) if text else {}
                except json.JSONDecodeError:
                    payload = {"message": text[:500]}
                if resp.status >= 400:
                    raise ApiError(status=resp.status, method=method, path=path, body=payload)
                return payload if isinstance(payload, dict) else {"items": payload}
        finally:
            left = self._in_flight.get(session, 1) - 1
            if left > 0:
                self._in_flight[session] = left
            else:
                self._in_flight.pop(session, None)
                if session in self._draining:
                    self._draining.discard(session)
                    await session.close()

    async def _reauthenticate(self, *, failed: kopf.ConnectionInfo) -> bool:
        """After a 401 with `failed`: True when other credentials are now in use (retry with them)."""
        if self._relogin_lock is None:
            self._relogin_lock = asyncio.Lock()
        async with self._relogin_lock:
            if self._info is not None and not same_credentials(self._info, failed):
                return True  # another request (or Kopf's login) has already swapped them
            if self._relogin is None:
                return False
            now = time.monotonic()
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
            self._last_relogin = (time.monotonic(), fresh if fresh is not None else failed)
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
