"""The third-party APIs the operator calls that the other unit tests never reach, called for real.

The lowest-versions tier (`make test-lowest`) runs the unit tests with every direct
dependency at its lower bound in pyproject.toml; a bound is only as true as the code the
tests execute at it. These tests execute what the rest leave out because it needs a running
operator: the startup handler setting Kopf's settings (label selectors, storages, scanning),
the login handler reading a kubeconfig through the `kubernetes` client library, and the
KubeClient sending a request with what `kopf.ConnectionInfo` makes of it (headers, TLS
context) through aiohttp. No API server is needed: the request goes to a loopback aiohttp
server that records it.
"""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from aiohttp import web
from finetune_operator import handlers, kube


async def maybe_await(value: Any) -> Any:
    """The login handler and KubeClient.connect may be plain or async; either is fine here."""
    return await value if inspect.isawaitable(value) else value


STARTUP = """
import asyncio, json, kopf
from finetune_operator import handlers, settings

memo = handlers.make_memo(config=settings.OperatorConfig(
    progress_host="127.0.0.1", progress_port=0, metrics_host="127.0.0.1", metrics_port=0))
s = kopf.OperatorSettings()

def selectors(group, version, plural):
    return s.watching.label_selectors.collect(kopf.Resource(group, version, plural))

async def main():
    await handlers.startup(settings=s, memo=memo, logger=None)
    try:
        print(json.dumps({
            "jobs": selectors("batch", "v1", "jobs"),
            "pods": selectors("", "v1", "pods"),
            "ftjs": selectors("finetune.dev", "v1alpha1", "finetunejobs"),
            "progress_storage": type(s.persistence.progress_storage).__name__,
            "diffbase_storage": type(s.persistence.diffbase_storage).__name__,
            "finalizer": s.persistence.finalizer,
            "scanning_disabled": s.scanning.disabled,
            "posting_enabled": s.posting.enabled,
            "hub": handlers.operator_of(memo).hub is not None,
            "progress_port": handlers.operator_of(memo).config.progress_port,
        }))
    finally:
        await handlers.cleanup(memo=memo)

asyncio.run(main())
"""


def test_startup_sets_the_kopf_settings_it_relies_on() -> None:
    # In a subprocess: startup opens the progress endpoint and the metrics server's thread.
    done = subprocess.run(
        [sys.executable, "-c", STARTUP], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    managed = ",".join(f"{k}={v}" for k, v in handlers.MANAGED.items())
    # Server-side filtering: Kopf puts these into the watch requests of Jobs and pods only.
    assert got["jobs"] == [managed]
    assert got["pods"] == [managed]
    assert got["ftjs"] == []
    assert got["progress_storage"] == "AnnotationsProgressStorage"
    assert got["diffbase_storage"] == "WatchOnlyDiffBaseStorage"
    assert got["finalizer"] == "finetune.dev/finalizer"
    assert got["scanning_disabled"] is True
    assert got["posting_enabled"] is False
    assert got["hub"] is True
    assert got["progress_port"] == 0  # the Operator in the memo was made from make_memo's configuration


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points the `kubernetes` client library at a token kubeconfig in tmp_path (not in-cluster)."""
    import kubernetes.config.kube_config

    path = tmp_path / "kubeconfig"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    # The library reads $KUBECONFIG once, at import; this is the name load_kube_config() uses.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    return path


async def test_login_reads_the_kubeconfig_and_the_client_sends_its_token(kubeconfig: Path) -> None:
    seen: list[dict[str, Any]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append({"path": request.path, "headers": dict(request.headers), "body": await request.text()})
        return web.json_response({"kind": "Status", "status": "Success"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "tok-123"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        ),
        encoding="utf-8",
    )
    client = kube.KubeClient(user_agent="surface-test")
    memo = kopf.Memo(operator=handlers.Operator(client=client))  # as the startup handler leaves it
    try:
        login: Any = handlers.login  # as Kopf calls it: keyword arguments, of which it takes what it needs
        info = await maybe_await(
            login(logger=logging.getLogger("test"), settings=kopf.OperatorSettings(), memo=memo)
        )
        assert isinstance(info, kopf.ConnectionInfo)
        assert info.server == f"http://127.0.0.1:{port}"
        assert info.token == "tok-123"
        answer_body = await client.merge_patch(
            "/apis/x/v1/namespaces/n/things/t/status", {"status": {"a": 1}}
        )
    finally:
        await client.close()
        await runner.cleanup()
    assert answer_body == {"kind": "Status", "status": "Success"}
    assert len(seen) == 1
    request = seen[0]
    assert request["path"] == "/apis/x/v1/namespaces/n/things/t/status"
    assert request["headers"]["Authorization"] == "Bearer tok-123"
    assert request["headers"]["User-Agent"] == "surface-test"
    assert request["headers"]["Content-Type"] == "application/merge-patch+json"
    assert json.loads(request["body"]) == {"status": {"a": 1}}


async def test_client_raises_the_api_servers_refusal() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"kind": "Status", "reason": "Conflict", "message": "exists"}, status=409)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = kube.KubeClient()
    await maybe_await(
        client.connect(
            info=kopf.ConnectionInfo(server=f"http://127.0.0.1:{runner.addresses[0][1]}", token="t")
        )
    )
    try:
        with pytest.raises(kube.ApiError) as caught:
            await client.create("/api/v1/namespaces/n/configmaps", {"metadata": {"name": "x"}})
    finally:
        await client.close()
        await runner.cleanup()
    assert caught.value.status == 409
    assert caught.value.reason == "Conflict"
