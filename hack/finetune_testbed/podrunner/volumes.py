"""Volumes: hostPath, PVC folders, emptyDir, configMap/secret/projected/downwardAPI files, /etc/hosts of netns pods."""

from __future__ import annotations

import os
from pathlib import Path

from finetune_testbed.podrunner import container as containers
from finetune_testbed.podrunner import podnet
from finetune_testbed.podrunner.common import DEFAULT_TERMINATION_PATH, Obj
from finetune_testbed.podrunner.state import ConfigError, PodRun
from finetune_testbed.podrunner.tokens import Tokens


class Volumes(Tokens):
    """Volumes: hostPath, PVC folders, emptyDir, configMap/secret/projected/downwardAPI files, /etc/hosts of netns pods."""

    def write_files(self, target: Path, files: dict[str, bytes], *, mode: int) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.chmod(path, mode)

    def projected_items(self, values: dict[str, bytes], items: list[Obj] | None) -> dict[str, bytes]:
        if not items:
            return dict(values)
        out = {}
        for item in items:
            if item["key"] in values:
                out[item["path"]] = values[item["key"]]
            else:
                raise ConfigError(f"key {item['key']} not found")
        return out

    def downward_files(self, pod: Obj, items: list[Obj], container: str) -> dict[str, bytes]:
        out = {}
        for item in items:
            if "fieldRef" in item:
                out[item["path"]] = self.field_value(pod, item["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in item:
                out[item["path"]] = self.resource_value(pod, item["resourceFieldRef"], container).encode()
        return out

    def volume_source(self, run: PodRun, vol: Obj) -> tuple[Path, bool]:
        """Makes the volume's host folder; returns it and whether it is always read-only."""
        pod, ns = run.pod, run.namespace
        name = vol["name"]
        vdir = run.dir / "volumes" / name
        mode = int(vol.get("defaultMode", 0o644)) if isinstance(vol.get("defaultMode"), int) else 0o644
        if "hostPath" in vol:
            hp = vol["hostPath"]
            path = Path(hp["path"])
            kind = hp.get("type", "")
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate" and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            if not path.exists():
                raise ConfigError(f"hostPath {path} does not exist")
            return path, False
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]
            path = self.dir / "volumes" / ns / claim["claimName"]
            path.mkdir(parents=True, exist_ok=True)
            self.own_volume(pod, path)
            return path, bool(claim.get("readOnly"))
        if "emptyDir" in vol or "ephemeral" in vol:
            vdir.mkdir(parents=True, exist_ok=True)
            if self.podman is not None:
                os.chmod(vdir, 0o777)  # as the kubelet makes an emptyDir
            self.own_volume(pod, vdir)
            return vdir, False
        if "configMap" in vol or "secret" in vol:
            is_secret = "secret" in vol
            src = vol["secret" if is_secret else "configMap"]
            ref = src.get("secretName" if is_secret else "name", "")
            values = self.key_values("secrets" if is_secret else "configmaps", ns, ref)
            if values is None:
                if not src.get("optional"):
                    raise ConfigError(f'{"secret" if is_secret else "configmap"} "{ref}" not found')
                values = {}
            mode = int(src.get("defaultMode", 0o644))
            self.write_files(vdir, self.projected_items(values, src.get("items")), mode=mode)
            return vdir, True
        if "downwardAPI" in vol:
            src = vol["downwardAPI"]
            files = self.downward_files(pod, src.get("items") or [], pod["spec"]["containers"][0]["name"])
            self.write_files(vdir, files, mode=int(src.get("defaultMode", 0o644)))
            return vdir, True
        if "projected" in vol:
            src = vol["projected"]
            projected: dict[str, bytes] = {}
            for s in src.get("sources") or []:
                if "serviceAccountToken" in s:
                    token_source = s["serviceAccountToken"]
                    projected[token_source["path"]] = self.token(pod, token_source)
                    run.tokens.append((vdir / token_source["path"], token_source, self.renew_at(token_source)))
                elif "configMap" in s or "secret" in s:
                    is_secret = "secret" in s
                    ref = s["secret" if is_secret else "configMap"]
                    values = self.key_values("secrets" if is_secret else "configmaps", ns, ref["name"])
                    if values is None:
                        if ref.get("optional"):
                            continue
                        raise ConfigError(f'{"secret" if is_secret else "configmap"} "{ref["name"]}" not found')
                    projected.update(self.projected_items(values, ref.get("items")))
                elif "downwardAPI" in s:
                    projected.update(
                        self.downward_files(pod, s["downwardAPI"].get("items") or [], pod["spec"]["containers"][0]["name"])
                    )
            self.write_files(vdir, projected, mode=int(src.get("defaultMode", 0o644)))
            return vdir, True
        raise ConfigError(f"volume {name}: unsupported volume type")

    def own_volume(self, pod: Obj, path: Path) -> None:
        """Container mode: the pod's fsGroup owns a volume that supports ownership (emptyDir,
        claims), as the kubelet applies it; a process runs as root and needs none of this."""
        sc = pod["spec"].get("securityContext") or {}
        if self.podman is None or sc.get("fsGroup") is None:
            return
        containers.apply_fs_group(path, gid=int(sc["fsGroup"]), policy=sc.get("fsGroupChangePolicy"))

    def prepare(self, run: PodRun) -> None:
        """Materialises every volume once per pod and computes each container's mounts."""
        if run.prepared:
            return
        sources: dict[str, tuple[Path, bool]] = {}
        for vol in run.pod["spec"].get("volumes") or []:
            sources[vol["name"]] = self.volume_source(run, vol)
        if self.net is not None and run.address is None:
            try:
                run.address = self.net.attach(pod=run.pod)
            except podnet.NetworkError as err:
                raise ConfigError(f"pod network: {err}") from err
        for c in run.init + run.main:
            c.dir.mkdir(parents=True, exist_ok=True)
            mounts: list[Obj] = []
            for vm in c.spec.get("volumeMounts") or []:
                if vm["name"] not in sources:
                    raise ConfigError(f"volume {vm['name']} is not defined in the pod")
                src, always_ro = sources[vm["name"]]
                if vm.get("subPath"):
                    src = src / vm["subPath"]
                    if not src.exists():
                        src.mkdir(parents=True, exist_ok=True)
                mounts.append({"source": str(src), "target": vm["mountPath"],
                               "readOnly": always_ro or bool(vm.get("readOnly"))})
            term = c.dir / "termination-log"
            term.write_bytes(b"")
            os.chmod(term, 0o666)  # the kubelet's mode: any uid in the container writes it
            target = c.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
            mounts.append({"source": str(term), "target": target, "readOnly": False})
            if run.address is not None:
                mounts.append({"source": str(self.net_hosts(run)), "target": "/etc/hosts", "readOnly": True})
            run.mounts[c.name] = mounts
        run.prepared = True

    def net_hosts(self, run: PodRun) -> Path:
        assert self.net is not None
        return self.net.hosts_path(run.uid)
