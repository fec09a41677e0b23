"""The local pod runner: plays the kubelet (and the scheduler) for one Node.

Dev and test tooling, not the product. It registers Node `local-node` (Ready, with
`nvidia.com/gpu` capacity), renews its Lease and Ready condition, binds every pending pod
that fits to it, and runs each container's command as a local process:

- with the repo's `.venv/bin` first on PATH and the container's env (value and valueFrom
  secretKeyRef / configMapKeyRef / fieldRef / resourceFieldRef, envFrom), `$(VAR)` expanded;
- in a mount namespace of its own (hack/localcluster_exec.py, run by path): every volume bind-mounted at
  its mountPath (hostPath as is; a PVC as .cluster/volumes/<ns>/<claim>; emptyDir a per-pod
  folder; configMap/secret/projected/downwardAPI materialised as files, read-only; a projected
  serviceAccountToken minted by TokenRequest, bound to the pod, and minted again at 80 % of
  its lifetime as the kubelet does), the termination-message path a per-pod file, `readOnly`
  honoured;
- logging to .cluster/logs/<ns>_<pod>_<container>.log;
- pod IP 127.0.0.1 (pods share the machine's network, as with hostNetwork); or, with
  `--pod-network=netns` (FTO_POD_NETWORK=netns in hack/cluster.py), a network namespace per
  pod on a bridge, its own address, hostname and /etc/hosts: see podnet.py (finetune_testbed.podrunner.podnet).

Status is written like a kubelet's: Running with startedAt, then Succeeded/Failed with the
exit code, reason and termination message (FallbackToLogsOnError honoured). A deleted pod's
containers get SIGTERM, then SIGKILL after its grace period, then the pod object is removed.

Pods that cannot start get what a real cluster says: an image reference that does not parse
waits with InvalidImageName (the kubelet's message); a missing ConfigMap or Secret (env or
volume) with CreateContainerConfigError; a PersistentVolumeClaim that does not exist (or is
being deleted) keeps the pod unscheduled with the scheduler's `persistentvolumeclaim "x" not
found`, re-checked every few seconds so that a claim created later lets it start. Claims are
not bound to volumes here (no provisioner): a claim that exists is taken as bound.

`--pods=container` (what `FTO_PODS=container` selects in hack/cluster.py) runs each container
from its image with podman and runc instead, with the pod's securityContext applied, its
volumes as bind mounts and `containerID: podman://<id>` in the status; see
container.py (finetune_testbed.podrunner.container) for what it does and what it leaves out. The default,
`--pods=process`, is the fast mode above: the repo's own code, no image involved.

`--simulate SECONDS` runs nothing: every pod turns Running and then Succeeded (exit 0) after
SECONDS. Either way there is one watch, one loop thread and a few writer threads; no thread
per pod. Images are never pulled; an image whose registry host ends in `.invalid` "fails to
pull" (Waiting ErrImagePull/ImagePullBackOff) so pull errors can be tested.

The entry point is `hack/podrunner.py` (hack/cluster.py starts it; its command line is what
`down` and `up` look for), or `python -m finetune_testbed.podrunner`. The package, by concern:

    common       constants, small pure helpers        api        the API server, writer threads
    scheduling   node affinity, requests, the Node    logserver  the `kubectl logs` endpoint
    images       image references, pull errors        state      a pod's run and its containers'
    base         the runner's state, API lookups      environment  env, envFrom, fieldRef, $(VAR)
    tokens       projected ServiceAccount tokens      volumes    every volume kind, /etc/hosts
    status       pod status as a kubelet writes it    kubelet    containers: start, restart, exit, delete
    simulated    --simulate SECONDS                   runner     the node, the watch, binding, the loop
    container    --pods=container (podman + runc)     podnet     --pod-network=netns
    cli          the command line

PodRunner is those layers stacked (RunnerBase < Environment < Tokens < Volumes < PodStatus <
Kubelet < Simulated < PodRunner), each a module of its own.
"""
