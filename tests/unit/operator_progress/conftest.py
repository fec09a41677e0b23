"""Fixtures for the progress hub tests: a live hub on 127.0.0.1:0 with a status recorder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from finetune_contract import protocol
from finetune_operator.progress import ProgressHub
from progress_helpers import Live, MakeLive, StatusRecorder, TokenTable


@pytest.fixture
async def make_live() -> AsyncIterator[MakeLive]:
    """Start hubs on 127.0.0.1:0 with the given settings; stop them after the test."""
    started: list[Live] = []

    async def make(**kwargs: Any) -> Live:
        recorder = StatusRecorder()
        tokens = TokenTable()
        hub = ProgressHub(patch_status=recorder, authenticate=kwargs.pop("authenticate", tokens), **kwargs)
        port = await hub.start(host="127.0.0.1", port=0)
        session = aiohttp.ClientSession()
        live = Live(
            hub=hub,
            recorder=recorder,
            url=f"http://127.0.0.1:{port}{protocol.PROGRESS_PATH}",
            session=session,
            tokens=tokens,
        )
        started.append(live)
        return live

    yield make
    for live in started:
        await live.session.close()
        await live.hub.stop()
