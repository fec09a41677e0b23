"""A container's environment: env, envFrom, fieldRef and resourceFieldRef, $(VAR)."""

from __future__ import annotations

import os

from finetune_testbed.podrunner.base import RunnerBase
from finetune_testbed.podrunner.common import ROOT, Obj, expand_vars, parse_quantity
from finetune_testbed.podrunner.state import ConfigError


class Environment(RunnerBase):
    """A container's environment: env, envFrom, fieldRef and resourceFieldRef, $(VAR)."""

    def host_ip(self) -> str:
        """Where pods reach this machine: loopback (host network) or the bridge (netns)."""
        return self.net.gateway if self.net is not None else "127.0.0.1"

    def pod_ip(self, uid: str) -> str:
        address = self.net.pods.get(uid) if self.net is not None else None
        return address.ip if address is not None else "127.0.0.1"

    def field_value(self, pod: Obj, path: str) -> str:
        meta = pod["metadata"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            "status.hostIP": self.host_ip(),
            "status.hostIPs": self.host_ip(),
            "status.podIP": self.pod_ip(meta["uid"]),
            "status.podIPs": self.pod_ip(meta["uid"]),
        }
        if path in simple:
            return str(simple[path])
        for prefix, source in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
            values = meta.get(source) or {}
            if path == prefix:
                return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
            if path.startswith(prefix + "['") and path.endswith("']"):
                return str(values.get(path[len(prefix) + 2 : -2], ""))
        raise ConfigError(f"unsupported fieldRef {path}")

    def resource_value(self, pod: Obj, ref: Obj, default_container: str) -> str:
        cname = ref.get("containerName") or default_container
        resource = ref["resource"]
        container: Obj = next((c for c in pod["spec"]["containers"] if c["name"] == cname), {})
        section, _, res = resource.partition(".")
        res_spec = container.get("resources") or {}
        value = (res_spec.get(section) or {}).get(res) or (res_spec.get("limits") or {}).get(res)
        if value is None:
            value = self.capacity.get(res, "0")
        divisor = parse_quantity(ref.get("divisor", "1"))
        amount = parse_quantity(value) / divisor
        return str(int(amount.to_integral_value(rounding="ROUND_CEILING")))

    def container_env(self, pod: Obj, c: Obj) -> dict[str, str]:
        """The container's environment: what the kubelet adds, then envFrom, then env.

        In process mode also PATH (the repo's .venv first), HOME and HOSTNAME, which a
        container gets from its image and runtime instead."""
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        if self.podman is None:
            env.update({
                "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": os.environ.get("HOME", "/root"),
                "HOSTNAME": pod["metadata"]["name"],
            })  # fmt: skip
        env.update({
            "KUBERNETES_SERVICE_HOST": self.host_ip(),
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.api_port),
        })  # fmt: skip
        for source in c.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                ref = source.get(key)
                if ref is None:
                    continue
                values = self.key_values(kind, ns, ref["name"])
                if values is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'{kind[:-1]} "{ref["name"]}" not found')
                for k, v in values.items():
                    env[prefix + k] = v.decode(errors="replace")
        for item in c.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand_vars(item.get("value", ""), env)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                env[name] = self.field_value(pod, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[name] = self.resource_value(pod, vf["resourceFieldRef"], c["name"])
            else:
                kind, key = ("secrets", "secretKeyRef") if "secretKeyRef" in vf else ("configmaps", "configMapKeyRef")
                ref = vf[key]
                values = self.key_values(kind, ns, ref["name"])
                if values is None or ref["key"] not in values:
                    if ref.get("optional"):
                        continue
                    what = f'{kind[:-1]} "{ref["name"]}"'
                    raise ConfigError(
                        f"{what} not found" if values is None else f'couldn\'t find key {ref["key"]} in {what}'
                    )
                env[name] = values[ref["key"]].decode(errors="replace")
        return env
