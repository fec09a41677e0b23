"""The API server as JSON through the kubernetes package (requests, the pod watch) and the writer threads."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from finetune_testbed.podrunner.common import Obj, log


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:300]}")
        self.status = status


class Api:
    """JSON requests and watches through the `kubernetes` package: the client the operator uses too.

    The operator runs the asyncio flavour (`kubernetes.aio`, in finetune_operator/kube.py); the
    pod runner's threads run the sync one, configured from the same kubeconfig loader (TLS,
    client certificates, exec and OIDC plugins and their token refresh). Bodies stay plain JSON
    (`ApiClient.param_serialize` and `call_api`, no model deserialisation), and the pod watch is
    `kubernetes.watch.Watch`'s (line splitting, ERROR events raised as `ApiException`). GET
    requests honour a Retry-After the server sends with a 429 or 5xx (client-go's rule,
    `client_go_retries`); other failures reach the caller, whose loop retries.
    """

    def __init__(self, *, kubeconfig: str) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
        cfg.connection_pool_maxsize = 32
        cfg.client_go_retries = True
        self.host = cfg.host.rstrip("/")
        self._client = client.ApiClient(cfg)
        self._core = client.CoreV1Api(self._client)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, Any] | None = None,
        ok: tuple[int, ...] = (),
        timeout: float = 30.0,
    ) -> Obj:
        method, url, headers, data, _ = self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((params or {}).items()) or None,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self._client.call_api(method, url, header_params=headers, body=data, _request_timeout=timeout)
        raw: bytes = resp.read() or b""  # type: ignore[no-untyped-call]
        if resp.status >= 300 and resp.status not in ok:
            raise ApiError(resp.status, raw.decode(errors="replace"), f"{method} {path}")
        try:
            parsed: Obj = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        parsed.setdefault("_status", resp.status)
        return parsed

    def watch_pods(self, *, resource_version: str, timeout_s: int = 300) -> Iterator[Obj]:
        """Every pod's events from `resource_version` on, as plain dicts, until the server ends the watch.

        A 410 (HTTP, or an ERROR event) is raised as ApiError(410): list again.
        """
        from kubernetes import client, watch

        def list_pods(**kwargs: Any) -> Any:
            # No docstring, so Watch has no model to decode into: events carry the raw JSON.
            return self._core.list_pod_for_all_namespaces(**kwargs)

        stream = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            yield from stream.stream(  # type: ignore[no-untyped-call]
                list_pods,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _request_timeout=timeout_s + 30,
            )
        except client.ApiException as err:
            raise ApiError(int(err.status or 0), str(err.reason or err.body or ""), "WATCH /api/v1/pods") from err
        finally:
            stream.stop()  # type: ignore[no-untyped-call]


class Writers:
    """A few writer threads; work for one pod always goes to the same thread, so in order."""

    def __init__(self, *, count: int) -> None:
        self._queues: list[queue.Queue[Callable[[], object] | None]] = [queue.Queue() for _ in range(count)]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"writer-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    def submit(self, key: str, fn: Callable[[], object]) -> None:
        self._queues[hash(key) % len(self._queues)].put(fn)

    def stop(self, *, timeout: float) -> None:
        for q in self._queues:
            q.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _run(q: queue.Queue[Callable[[], object] | None]) -> None:
        while True:
            fn = q.get()
            if fn is None:
                return
            for attempt in range(6):
                try:
                    fn()
                    break
                except ApiError as err:
                    if err.status in (404, 409, 422) or attempt == 5 or (err.status < 500 and err.status != 429):
                        log.warning("%s", err)
                        break
                except Exception as err:  # connection trouble: retry with backoff
                    if attempt == 5:
                        log.warning("giving up: %s", err)
                        break
                time.sleep(0.2 * 2**attempt)
