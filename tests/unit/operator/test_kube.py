"""kube.KubeClient's pure parts: when two logins are the same credentials, and the headers it sends.

The session swapping, draining and the re-login after a 401 run against a real API server in
tests/integration/test_survival.py.
"""

from __future__ import annotations

import base64
import datetime

import kopf
import pytest
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
