"""The operator's Kopf identity needs no passwd entry for its uid (the image's 65532 has none)."""

from __future__ import annotations

import pwd
import re

import pytest
from finetune_operator import __main__ as main

pytestmark = pytest.mark.unit


def test_identity_is_the_pod_name_when_the_deployment_gives_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_ID", raising=False)
    monkeypatch.setenv("POD_NAME", "finetune-operator-5d9c-abcde")
    assert main.own_identity() == "finetune-operator-5d9c-abcde"


def test_identity_without_a_passwd_entry_for_the_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a container with an unknown uid sees: no USER/LOGNAME, getpwuid raises KeyError."""
    for name in ("POD_ID", "POD_NAME", "USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)

    def unknown(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)
    identity = main.own_identity()
    assert re.fullmatch(r"uid-\d+@[^/]+/\d{14}/[0-9a-f]{4}", identity), identity
