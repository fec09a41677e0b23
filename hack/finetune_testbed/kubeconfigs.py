"""Kubeconfigs of the local control plane's users: client certificates (the components and the
admin, hack/cluster.py) and ServiceAccount tokens (the operator as the demo, the benches and
the tests run it). Pure builders apart from `write` and `mint_token`."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "KubeconfigError",
    "admin_cluster",
    "mint_token",
    "service_account_user",
    "token_kubeconfig",
    "write",
]


class KubeconfigError(RuntimeError):
    """A token could not be minted; the message says why."""


def _config(*, cluster: Mapping[str, Any], user: str, credentials: Mapping[str, str], context: str,
            namespace: str | None) -> dict[str, Any]:
    ctx: dict[str, str] = {"cluster": "local", "user": user}
    if namespace is not None:
        ctx["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": dict(cluster)}],
        "users": [{"name": user, "user": dict(credentials)}],
        "contexts": [{"name": context, "context": ctx}],
        "current-context": context,
    }


def certificate_kubeconfig(*, server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str) -> dict[str, Any]:
    """A kubeconfig with embedded client certificate credentials (context `local`)."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    config = _config(
        cluster={"server": server, "certificate-authority-data": b64(ca_pem)}, user=user,
        credentials={"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
        context="local", namespace=None,
    )  # fmt: skip
    config["preferences"] = {}
    return config


def service_account_user(*, namespace: str, name: str) -> str:
    """The user name the API server gives ServiceAccount namespace/name."""
    return f"system:serviceaccount:{namespace}:{name}"


def token_kubeconfig(
    *, cluster: Mapping[str, Any], user: str, token: str | None = None, token_file: str | Path | None = None,
    context: str = "local", namespace: str | None = None,
) -> dict[str, Any]:
    """A kubeconfig of `user` on `cluster` (a kubeconfig's cluster entry: server and CA) with a
    bearer token: `token` inline, else read from `token_file`."""
    if token is None and token_file is None:
        raise ValueError("a token or a token file is needed")
    credentials = {"token": token} if token is not None else {"tokenFile": str(token_file)}
    return _config(cluster=cluster, user=user, credentials=credentials, context=context, namespace=namespace)


def admin_cluster(admin_kubeconfig: Path) -> dict[str, Any]:
    """The cluster entry (server and CA) of an admin kubeconfig."""
    import yaml

    cluster: dict[str, Any] = yaml.safe_load(admin_kubeconfig.read_text(encoding="utf-8"))["clusters"][0]["cluster"]
    return cluster


def write(path: Path, config: Mapping[str, Any]) -> Path:
    """Writes `config` to `path` as YAML, mode 0600 (it holds credentials); returns `path`."""
    import yaml

    path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    path.chmod(0o600)
    return path


def mint_token(*, kubectl: Path, admin_kubeconfig: Path, namespace: str, name: str, duration: str = "24h") -> str:
    """A TokenRequest token of ServiceAccount namespace/name (`kubectl create token`)."""
    minted = subprocess.run(
        [str(kubectl), f"--kubeconfig={admin_kubeconfig}", "create", "token", name, "-n", namespace,
         f"--duration={duration}"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    if minted.returncode != 0:
        raise KubeconfigError(f"kubectl create token {namespace}/{name}: {minted.stderr.strip()}")
    return minted.stdout.strip()
