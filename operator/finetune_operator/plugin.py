"""`kubectl finetune`: the kubectl plugin for FineTuneJobs (console script `kubectl-finetune`).

    kubectl finetune list [-A | -n NS]
    kubectl finetune watch NAME [--timeout SECONDS]
    kubectl finetune describe NAME
    kubectl finetune logs NAME [-f] [--attempt N]
    kubectl finetune suspend NAME | resume NAME

It uses the user's kubeconfig like kubectl does (`--kubeconfig`, else `KUBECONFIG`, else
`~/.kube/config`; `--context`; `-n/--namespace`, else the context's namespace, else
`default`; in a pod with no kubeconfig, the in-cluster ServiceAccount). It needs only the
`cli` extra (kubernetes, rich): it imports neither TensorFlow, Keras nor Kopf.

`watch` follows the object with a watch (no polling) and draws a live view with a bar per
stage in a terminal, one plain line per change otherwise; it exits 0 when the job
Succeeded and 1 when it Failed. The exit codes are the `EXIT_*` constants of
`plugin_format` (README: "kubectl finetune"). Formatting lives in `plugin_format` (pure);
this module does the I/O.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from kubernetes import client, config, watch
from kubernetes.config.config_exception import ConfigException
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text
from urllib3.exceptions import HTTPError as Urllib3Error

from finetune_operator import plugin_format as fmt

__all__ = ["main"]

WATCH_CHUNK_S = 300  # one server-side watch lasts at most this long; then it is opened again


class PluginError(Exception):
    """An error for the user: its message is printed after `error: `, the process exits with `code`."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


@dataclass
class Kube:
    """The API clients of one kubeconfig context and the namespace the command works in."""

    api: client.ApiClient
    namespace: str

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def crd_installed(self) -> bool:
        """Whether discovery lists finetunejobs in finetune.dev/v1alpha1."""
        try:
            found = client.CustomObjectsApi(self.api).get_api_resources(fmt.GROUP, fmt.VERSION)
        except client.ApiException as err:
            if err.status == 404:
                return False
            raise
        return any(r.name == fmt.PLURAL for r in found.resources or [])


def connect(*, kubeconfig: str | None, context: str | None, namespace: str | None) -> Kube:
    """Clients for the kubeconfig and context (kubectl's rules), and the namespace to use."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    files = [p for p in path.split(os.pathsep) if p]
    if not kubeconfig and not any(Path(p).expanduser().exists() for p in files) and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        ns = namespace or (sa_ns.read_text().strip() if sa_ns.exists() else "default")
        return Kube(api=client.ApiClient(), namespace=ns)
    try:
        contexts, active = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
        chosen = active
        if context is not None:
            chosen = next((c for c in contexts if c.get("name") == context), None)
            if chosen is None:
                raise PluginError(f'context "{context}" not found in the kubeconfig ({path})', code=fmt.EXIT_CONNECTION)
        api = config.new_client_from_config(config_file=path, context=context)  # type: ignore[no-untyped-call]
    except ConfigException as err:
        raise PluginError(f"no usable kubeconfig ({path}): {err}", code=fmt.EXIT_CONNECTION) from err
    except OSError as err:
        raise PluginError(f"cannot read the kubeconfig ({path}): {err}", code=fmt.EXIT_CONNECTION) from err
    ns = namespace or ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return Kube(api=api, namespace=str(ns))


def api_failure(
    kube: Kube, err: client.ApiException, *, verb: str, resource: str, namespace: str | None, name: str | None = None
) -> PluginError:
    """The user's error for an API error answer to `verb resource[/name]` (a 404 of the resource: CRD missing?)."""
    if err.status == 404 and resource == fmt.RESOURCE and not _crd_installed(kube):
        return PluginError(
            f"the FineTuneJob CRD is not installed in this cluster ({fmt.GROUP}/{fmt.VERSION})", code=fmt.EXIT_NO_CRD
        )
    body = err.body if isinstance(err.body, str) else (err.body or b"").decode(errors="replace")
    code, message = fmt.api_error_message(
        status=int(err.status or 0), body=body, verb=verb, resource=resource, namespace=namespace, name=name
    )
    return PluginError(message, code=code)


def unreachable(kube: Kube, err: Exception) -> PluginError:
    host = kube.api.configuration.host
    return PluginError(f"cannot reach the API server at {host}: {fmt.clean(err, limit=300)}", code=fmt.EXIT_CONNECTION)


def call(
    kube: Kube,
    *,
    verb: str,
    resource: str,
    namespace: str | None,
    name: str | None = None,
    request: Callable[[], Any],
) -> Any:
    """Runs one API request and turns its failure into a PluginError that names what was tried."""
    try:
        return request()
    except client.ApiException as err:
        raise api_failure(kube, err, verb=verb, resource=resource, namespace=namespace, name=name) from err
    except (Urllib3Error, OSError) as err:
        raise unreachable(kube, err) from err


def _crd_installed(kube: Kube) -> bool:
    try:
        return kube.crd_installed()
    except (client.ApiException, Urllib3Error, OSError):
        return True  # discovery itself failed: report the original answer, not a guess


def get_job(kube: Kube, name: str) -> dict[str, Any]:
    return dict(
        call(
            kube,
            verb="get",
            resource=fmt.RESOURCE,
            namespace=kube.namespace,
            name=name,
            request=lambda: kube.custom.get_namespaced_custom_object(fmt.GROUP, fmt.VERSION, kube.namespace, fmt.PLURAL, name),
        )
    )


def _raw(answer: Any) -> Any:
    return json.loads(answer.data)


def trainer_pods(kube: Kube, name: str) -> list[dict[str, Any]]:
    found = call(
        kube,
        verb="list",
        resource="pods",
        namespace=kube.namespace,
        request=lambda: kube.core.list_namespaced_pod(
            kube.namespace, label_selector=f"{fmt.JOB_LABEL}={name}", _preload_content=False
        ),
    )
    return list(_raw(found).get("items") or [])


def job_events(kube: Kube, uid: str) -> list[dict[str, Any]]:
    found = call(
        kube,
        verb="list",
        resource="events",
        namespace=kube.namespace,
        request=lambda: kube.core.list_namespaced_event(
            kube.namespace, field_selector=f"involvedObject.uid={uid}", _preload_content=False
        ),
    )
    return list(_raw(found).get("items") or [])


# ----- commands -----


def cmd_list(kube: Kube, args: argparse.Namespace, out: TextIO) -> int:
    all_ns = bool(args.all_namespaces)
    if all_ns:
        found = call(
            kube,
            verb="list",
            resource=fmt.RESOURCE,
            namespace=None,
            request=lambda: kube.custom.list_cluster_custom_object(fmt.GROUP, fmt.VERSION, fmt.PLURAL),
        )
    else:
        found = call(
            kube,
            verb="list",
            resource=fmt.RESOURCE,
            namespace=kube.namespace,
            request=lambda: kube.custom.list_namespaced_custom_object(fmt.GROUP, fmt.VERSION, kube.namespace, fmt.PLURAL),
        )
    items = list(found.get("items") or [])
    if not items:
        where = "in any namespace" if all_ns else f"in namespace {kube.namespace}"
        print(f"No FineTuneJobs found {where}.", file=sys.stderr)
        return fmt.EXIT_OK
    tty = out.isatty()
    rows = fmt.list_rows(items, now=_now(), all_namespaces=all_ns, ascii_only=not tty)
    if not tty:
        out.write(fmt.render_plain_table(rows))
        return fmt.EXIT_OK
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for column in rows[0]:
        table.add_column(column, no_wrap=True)
    for row in rows[1:]:
        table.add_row(*(Text(cell) for cell in row))
    Console(file=out).print(table)
    return fmt.EXIT_OK


def _events(kube: Kube, name: str, *, timeout: float | None) -> Iterator[dict[str, Any] | None]:
    """The job's object at once and after every change (a watch); None once it is deleted.

    Ends when `timeout` seconds have passed. Each server-side watch lasts at most
    WATCH_CHUNK_S (or what is left of the timeout) and is opened again from the last
    resourceVersion seen; a 410 Gone (too far behind) reads the object again.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    job = get_job(kube, name)
    yield job
    version = str(job["metadata"].get("resourceVersion") or "")
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        chunk = WATCH_CHUNK_S if left is None else max(1, min(WATCH_CHUNK_S, math.ceil(left)))
        stream = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in stream.stream(  # type: ignore[no-untyped-call]
                kube.custom.list_namespaced_custom_object,
                fmt.GROUP,
                fmt.VERSION,
                kube.namespace,
                fmt.PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=version,
                timeout_seconds=chunk,
                allow_watch_bookmarks=True,
                _request_timeout=(10, chunk + 30),
            ):
                obj = event.get("object")
                kind = event.get("type")
                if isinstance(obj, Mapping):
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "DELETED":
                    yield None
                    return
                if kind in ("ADDED", "MODIFIED") and isinstance(obj, Mapping):
                    yield dict(obj)
                if deadline is not None and time.monotonic() >= deadline:
                    return
        except client.ApiException as err:
            if err.status != 410:
                raise api_failure(
                    kube, err, verb="watch", resource=fmt.RESOURCE, namespace=kube.namespace, name=name
                ) from err
            job = get_job(kube, name)  # the watch fell too far behind: read the object again
            version = str(job["metadata"].get("resourceVersion") or "")
            yield job
        except (Urllib3Error, OSError) as err:
            # A dropped or stalled connection: open the watch again from the last version seen.
            print(f"watch interrupted ({fmt.clean(err, limit=200)}); resuming", file=sys.stderr)
            if deadline is not None and time.monotonic() >= deadline:
                return
            get_job(kube, name)  # fails with a clear error when the server stays unreachable
        finally:
            stream.stop()  # type: ignore[no-untyped-call]


def _phase(job: Mapping[str, Any]) -> str:
    return str((job.get("status") or {}).get("phase") or "")


def cmd_watch(kube: Kube, args: argparse.Namespace, out: TextIO) -> int:
    name = args.name
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    tty = out.isatty() and not args.plain
    last: dict[str, Any] | None = None
    ended = False
    deleted = False
    if tty:
        console = Console(file=out)
        with Live(console=console, refresh_per_second=4, transient=False, auto_refresh=True) as live:
            for job in _events(kube, name, timeout=timeout):
                if job is None:
                    deleted = True
                    break
                last = job
                live.update(fmt.watch_renderable(job, now=_now()), refresh=True)
                if _phase(job) in ("Succeeded", "Failed"):
                    ended = True
                    break
    else:
        shown = ""
        for job in _events(kube, name, timeout=timeout):
            if job is None:
                deleted = True
                break
            last = job
            state = fmt.watch_state(job)
            if state != shown:
                shown = state
                out.write(fmt.watch_line(job, now=_now()) + "\n")
                out.flush()
            if _phase(job) in ("Succeeded", "Failed"):
                ended = True
                break
    if deleted:
        raise PluginError(f'finetunejob "{name}" was deleted in namespace {kube.namespace}', code=fmt.EXIT_NOT_FOUND)
    if not ended or last is None:
        raise PluginError(
            f"timed out after {fmt.duration(timeout)} waiting for ftj/{name} to finish"
            f" (phase {_phase(last or {}) or 'unknown'})",
            code=fmt.EXIT_TIMEOUT,
        )
    out.write(fmt.final_summary(last))
    out.flush()
    return fmt.EXIT_OK if _phase(last) == "Succeeded" else fmt.EXIT_FAILED


def cmd_describe(kube: Kube, args: argparse.Namespace, out: TextIO) -> int:
    job = get_job(kube, args.name)
    pods = trainer_pods(kube, args.name)
    events = job_events(kube, str(job["metadata"].get("uid") or ""))
    out.write(fmt.describe(job, pods=pods, events=events, now=_now()))
    return fmt.EXIT_OK


def _choose_pod(kube: Kube, name: str, *, attempt: int | None) -> fmt.Attempt:
    job = get_job(kube, name)
    counted = int((job.get("status") or {}).get("attempts") or 0)
    found = fmt.attempts(trainer_pods(kube, name), counted=counted)
    ran = [a for a in found if a.number is not None]
    if attempt is not None:
        match = next((a for a in ran if a.number == attempt), None)
        if match is None:
            have = ", ".join(str(a.number) for a in ran) or "none"
            raise PluginError(
                f"ftj/{name} has no pod of attempt {attempt} now (attempts with a pod: {have})", code=fmt.EXIT_NOT_FOUND
            )
        return match
    if ran:
        return ran[-1]
    if found:
        return found[-1]  # the newest pod, not started yet: kubectl's own words tell why
    phase = _phase(job) or "Pending"
    raise PluginError(f"ftj/{name} has no trainer pod now (phase {phase})", code=fmt.EXIT_NOT_FOUND)


def cmd_logs(kube: Kube, args: argparse.Namespace, out: TextIO) -> int:
    chosen = _choose_pod(kube, args.name, attempt=args.attempt)
    if chosen.number is None and not args.follow:
        raise PluginError(f"pod {chosen.pod} of ftj/{args.name} has not started its trainer yet", code=fmt.EXIT_NOT_FOUND)
    answer = call(
        kube,
        verb="get",
        resource="pods/log",
        namespace=kube.namespace,
        name=chosen.pod,
        request=lambda: kube.core.read_namespaced_pod_log(
            chosen.pod,
            kube.namespace,
            container=fmt.TRAINER_CONTAINER,
            follow=bool(args.follow),
            tail_lines=args.tail if args.tail is not None and args.tail >= 0 else None,
            _preload_content=False,
        ),
    )
    binary = getattr(out, "buffer", None)
    try:
        for chunk in answer.stream(4096, decode_content=True):
            text = chunk.decode("utf-8", errors="replace")
            cleaned = fmt.clean(text, one_line=False, limit=len(text) + 1)  # pod output: no terminal escapes
            if binary is not None:
                out.flush()
                binary.write(cleaned.encode())
                binary.flush()
            else:
                out.write(cleaned)
                out.flush()
    finally:
        answer.release_conn()
    return fmt.EXIT_OK


def _set_suspend(kube: Kube, name: str, *, suspend: bool, out: TextIO) -> int:
    call(
        kube,
        verb="patch",
        resource=fmt.RESOURCE,
        namespace=kube.namespace,
        name=name,
        request=lambda: kube.custom.patch_namespaced_custom_object(
            fmt.GROUP, fmt.VERSION, kube.namespace, fmt.PLURAL, name, {"spec": {"suspend": suspend}}
        ),
    )
    out.write(f"finetunejob.{fmt.GROUP}/{name} {'suspended' if suspend else 'resumed'}\n")
    return fmt.EXIT_OK


def cmd_suspend(kube: Kube, args: argparse.Namespace, out: TextIO) -> int:
    return _set_suspend(kube, args.name, suspend=True, out=out)


def cmd_resume(kube: Kube, args: argparse.Namespace, out: TextIO) -> int:
    return _set_suspend(kube, args.name, suspend=False, out=out)


# ----- command line -----

EXIT_CODES = """exit codes:
  0  done; watch: the job Succeeded
  1  watch: the job Failed
  2  bad command line
  3  watch: --timeout ran out before the job ended
  4  no such FineTuneJob (or pod, or attempt); watch: the job was deleted
  5  the FineTuneJob CRD is not installed in the cluster
  6  forbidden (RBAC, 403) or credentials rejected (401)
  7  no usable kubeconfig/context, or the API server cannot be reached
  8  any other API error
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(fmt.EXIT_USAGE, f"error: {message}\n")


def _connection_flags(*, suppress: bool) -> _Parser:
    """--kubeconfig/--context/-n, accepted before and after the command (defaults only at the top)."""
    parent = _Parser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parent.add_argument("--kubeconfig", default=default, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    parent.add_argument("--context", default=default, help="the kubeconfig context to use")
    parent.add_argument("-n", "--namespace", default=default, help="namespace (default: the context's, else default)")
    return parent


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="kubectl finetune",
        description="FineTuneJobs at the terminal: list, watch, describe, logs, suspend, resume.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_connection_flags(suppress=False)],
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    flags = _connection_flags(suppress=True)

    def add(name: str, help_text: str, handler: Callable[[Kube, argparse.Namespace, TextIO], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[flags], epilog=EXIT_CODES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        sub.set_defaults(handler=handler)
        return sub

    listing = add("list", "FineTuneJobs with phase, stage, progress, val accuracy and ETA", cmd_list)
    listing.add_argument("-A", "--all-namespaces", action="store_true", help="jobs of every namespace")
    watching = add("watch", "a live view of one job until it ends; exit 0 on Succeeded, 1 on Failed", cmd_watch)
    watching.add_argument("name")
    watching.add_argument("--timeout", type=float, default=0, help="give up after SECONDS (exit 3); 0: wait forever")
    watching.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    describing = add("describe", "conditions, failure reason, attempts, events and the model of one job", cmd_describe)
    describing.add_argument("name")
    logs = add("logs", "the trainer's logs (the latest attempt unless --attempt)", cmd_logs)
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="stream the logs")
    logs.add_argument("--attempt", type=int, default=None, help="attempt N (see describe)")
    logs.add_argument("--tail", type=int, default=None, help="only the last N lines")
    suspending = add("suspend", "suspend a job (spec.suspend: true; its pod goes away)", cmd_suspend)
    suspending.add_argument("name")
    resuming = add("resume", "resume a suspended job (spec.suspend: false)", cmd_resume)
    resuming.add_argument("name")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kubectl-finetune`; returns the exit code."""
    args = parser().parse_args(argv)
    out = sys.stdout
    try:
        kube = connect(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace)
        try:
            handler: Callable[[Kube, argparse.Namespace, TextIO], int] = args.handler
            return handler(kube, args, out)
        finally:
            kube.api.close()  # type: ignore[no-untyped-call]
    except PluginError as err:
        out.flush()
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return fmt.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
