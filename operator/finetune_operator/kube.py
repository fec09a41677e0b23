"""A small async Kubernetes API client on aiohttp, for the few writes the operator makes.

Kopf watches; this sends creates, patches, reads and events with the same credentials
(`kopf.ConnectionInfo`, from the login handler), in the operator's own event loop: no
threads, no model deserialisation, one pooled connection set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

__all__ = ["ApiError", "KubeClient"]


class ApiError(Exception):
    """A non-2xx answer of the API server."""

    def __init__(self, *, status: int, method: str, path: str, body: Mapping[str, Any]) -> None:
        self.status = status
        self.body = dict(body)
        self.reason = str(body.get("reason") or "")
        self.message = str(body.get("message") or body)
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")


class KubeClient:
    """Raw JSON requests to the API server; `connect` must be called (by the login handler) first."""

    def __init__(self, *, user_agent: str = "finetune-operator", pool_size: int = 32) -> None:
        self._user_agent = user_agent
        self._pool_size = pool_size
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None

    def connect(self, *, info: kopf.ConnectionInfo) -> None:
        """Uses these credentials from now on (the session is opened lazily, inside the loop)."""
        self._info = info
        self._session = None

    def _ensure(self) -> tuple[aiohttp.ClientSession, str]:
        if self._info is None:
            raise RuntimeError("KubeClient is not connected: no credentials yet")
        if self._session is None or self._session.closed:
            headers = dict(self._info.as_http_headers())
            headers["User-Agent"] = self._user_agent
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, ssl=self._info.as_ssl_context()),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=30, sock_connect=10),
            )
        return self._session, self._info.server.rstrip("/")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        session, server = self._ensure()
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with session.request(method, server + path, data=data, headers=headers, params=params) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else {}
            except json.JSONDecodeError:
                payload = {"message": text[:500]}
            if resp.status >= 400:
                raise ApiError(status=resp.status, method=method, path=path, body=payload)
            return payload if isinstance(payload, dict) else {"items": payload}

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=body)

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body=body, content_type="application/merge-patch+json")
