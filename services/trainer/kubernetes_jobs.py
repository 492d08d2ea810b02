"""Jobs run on Kubernetes: a headless Service and an indexed Job of worker pods, one pod per node,
rendered from a template (deploy/k8s/multinode/job.yaml) and created with the official client.

Each pod runs `launch_command` (torchrun's agent through `services.trainer.distributed`; the
agents meet by c10d rendezvous at pod 0, `<name>-0.<name>`, through the Service) on the job
folder, which a ReadWriteMany volume mounts at the same path in the trainer and in every pod:
the workers write job events there exactly as on this host, and the supervisor tails them.

What only the cluster knows ends the job when the workers cannot report: the Job's `Failed`
condition (with its pods' reasons: OOMKilled, an exit code, an eviction), or a pod that stays
unschedulable or cannot pull its image or start its container for `start_timeout_s` (counted
from that pod's own creation, or since it became unschedulable: a pod the Job controller
re-creates gets its own time). A pod killed by a signal (OOMKilled, evicted, exit 128+N: an
agent stopped by an eviction's, preemption's or drain's SIGTERM exits 143) ends as a worker
killed by that signal: the supervisor restarts the job from its last checkpoint within
`max_restarts`, as on this host. A cancel writes the job folder's `cancel` file, then deletes
the Job and Service (foreground propagation: the pods get SIGTERM, the agents see the file and
report the cancel); release deletes them too, and `forget` those of a job the trainer will not
resume after a restart of its own.

The client calls are blocking (urllib3); each runs in a thread. RBAC: the verbs used here are
exactly those `deploy/k8s/multinode/rbac.yaml` grants (tests/trainer/test_kubernetes_jobs.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import string
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import yaml
from kubernetes import client as kube
from kubernetes import config as kubeconfig
from kubernetes.client.exceptions import ApiException

from services.trainer.distributed import CANCEL_FILE, launch_command
from services.trainer.domain import JobError
from services.trainer.launchers import Exit, Launcher, LaunchFailed, Routed, multi_node
from services.trainer.settings import TrainerSettings

log = structlog.get_logger("tlm.trainer.kubernetes")
RENDEZVOUS_PORT = 29400
JOB_LABEL = "tlm.dev/job"
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Container waiting reasons that do not pass by themselves: the job fails after start_timeout_s.
STUCK_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


@dataclass(frozen=True)
class KubernetesConfig:
    template: Path
    image: str
    namespace: str
    volume_claim: str
    jobs_dir: Path  # the job folders' root: mounted from volume_claim at this path in every pod
    module: str  # the worker module, as on this host
    start_timeout_s: float = 600.0
    poll_s: float = 5.0
    api_outage_s: float = 300.0  # reads failing this long fail the job (UNAVAILABLE)
    gone_wait_s: float = 300.0  # how long start waits for a previous attempt's Job to go


def job_name(job_id: str) -> str:
    """The Service's and Job's name (a DNS label; the pods are `<name>-<index>`).

    >>> job_name("j-18c3f0a1b2c-1a2b3c4d")
    'tlm-j-18c3f0a1b2c-1a2b3c4d'
    """
    return f"tlm-{job_id}"


def render(config: KubernetesConfig, name: str, folder: Path, plan: dict[str, Any]) -> list[Any]:
    """The template's objects for one job: the Service and the Job (parsed YAML)."""
    nodes = int(plan.get("num_nodes", 1))
    rendezvous = f"{name}-0.{name}:{RENDEZVOUS_PORT}" if nodes > 1 else ""
    command = ["python", *launch_command(config.module, folder, plan, rendezvous, name)[1:]]
    gpus = int(plan.get("devices_per_node", 1)) if plan.get("device_type") == "cuda" else 0
    text = string.Template(config.template.read_text()).substitute(
        JOB=name,
        NODES=nodes,
        GPUS_PER_NODE=gpus,
        COMMAND=json.dumps(command),
        IMAGE=json.dumps(config.image),
        VOLUME_CLAIM=config.volume_claim,
        JOBS_DIR=json.dumps(str(config.jobs_dir)),
    )
    return list(yaml.safe_load_all(text))


def api_client() -> Any:
    """The trainer's service account in a pod, else the kubeconfig (KUBECONFIG or
    ~/.kube/config)."""
    try:
        configuration = kube.Configuration()
        kubeconfig.load_incluster_config(client_configuration=configuration)
        return kube.ApiClient(configuration)
    except kubeconfig.ConfigException:
        return kubeconfig.new_client_from_config(config_file=kubeconfig_path())


def kubeconfig_path() -> str:
    """KUBECONFIG (read now: the client reads it once, at import), else ~/.kube/config."""
    return os.environ.get("KUBECONFIG") or "~/.kube/config"


def default_namespace() -> str:
    """The trainer pod's own namespace, else the kubeconfig context's, else "default"."""
    if IN_CLUSTER_NAMESPACE.exists():
        return IN_CLUSTER_NAMESPACE.read_text().strip()
    try:
        _contexts, current = kubeconfig.list_kube_config_contexts(kubeconfig_path())
    except kubeconfig.ConfigException:
        return "default"
    return str(current.get("context", {}).get("namespace") or "default")


class KubernetesLauncher:
    def __init__(self, config: KubernetesConfig, api: Any) -> None:
        self.config = config
        self.core = kube.CoreV1Api(api)
        self.batch = kube.BatchV1Api(api)

    async def start(self, job_id: str, folder: Path, plan: dict[str, Any]) -> JobWorkers:
        name = job_name(job_id)
        service, job = render(self.config, name, folder, plan)
        workers = JobWorkers(self, name, folder)
        try:
            await asyncio.to_thread(workers.create, service, job)
        except ApiException as exc:  # the cluster refused it: RBAC, quota, an invalid template
            message = f"could not create {workers.label}: {exc.status} {exc.reason}: {_why(exc)}"
            raise LaunchFailed(JobError("FAILED_PRECONDITION", message)) from exc
        except Exception as exc:  # the network, the API server, a previous attempt not gone
            message = f"could not create {workers.label}: {exc}"
            raise LaunchFailed(JobError("UNAVAILABLE", message)) from exc
        return workers

    async def forget(self, job_id: str) -> None:
        """Delete the job's Job and Service, if a previous trainer process left them."""
        workers = JobWorkers(self, job_name(job_id), self.config.jobs_dir)
        await asyncio.to_thread(workers.delete)


class JobWorkers:
    """One job's Service and indexed Job. Every API call runs in `poll`/`release`/`create` (in a
    thread); `stop` and `kill` only ask, and the next poll deletes."""

    def __init__(self, launcher: KubernetesLauncher, name: str, folder: Path) -> None:
        self.launcher, self.name, self.folder = launcher, name, folder
        self.namespace = launcher.config.namespace
        self.label = f"Kubernetes Job {self.namespace}/{name}"
        self._created = time.monotonic()
        self._polled = -float("inf")
        self._failing_since: float | None = None  # the first of the reads failing in a row
        # A stop or kill asks for a delete (grace period: None the pods' own, 0 now) that the
        # next poll makes; then the Job's disappearance ends the run.
        self._asked: tuple[int | None] | None = None
        self._made: tuple[int | None] | None = None

    # The supervisor's side -------------------------------------------------------------------

    async def poll(self) -> Exit | None:
        due = self._polled + self.launcher.config.poll_s
        if time.monotonic() < due and not self._delete_pending():
            return None
        self._polled = time.monotonic()
        try:
            ended = await asyncio.to_thread(self._poll)
        except Exception as exc:  # the API server restarting, the network: keep following
            return self._unreachable(exc)
        self._failing_since = None
        return ended

    def stop(self) -> None:
        (self.folder / CANCEL_FILE).touch()  # every agent reports the cancel, on any node
        self._asked = self._asked or (None,)

    def kill(self) -> None:
        self._asked = (0,)

    async def release(self) -> None:
        try:
            await asyncio.to_thread(self._delete, self._asked[0] if self._asked else None)
        except Exception as exc:  # the Job's ttlSecondsAfterFinished removes it in the end
            log.warning("kubernetes_job_not_deleted", job=self.name, error=str(exc))

    def _unreachable(self, exc: Exception) -> Exit | None:
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        log.warning("kubernetes_job_unreadable", job=self.name, error=str(exc))
        outage = self.launcher.config.api_outage_s
        if now - self._failing_since < outage:
            return None
        message = f"{self.label} could not be read for {outage:g} s: {exc}"
        return Exit(None, "could not be followed", JobError("UNAVAILABLE", message))

    # The API calls -----------------------------------------------------------------------------

    def create(self, service: dict[str, Any], job: dict[str, Any]) -> None:
        """Create the Service and the Job, first deleting a previous attempt's (a restart, or a
        trainer that died while the job ran) and waiting until its pods are gone."""
        self._delete(None)
        deadline = time.monotonic() + self.launcher.config.gone_wait_s
        while self._read_job() is not None:
            if time.monotonic() >= deadline:
                raise RuntimeError("a previous attempt is still being deleted")
            time.sleep(1.0)
        ns = self.namespace
        self.launcher.core.create_namespaced_service(ns, service)
        try:
            self.launcher.batch.create_namespaced_job(ns, job)
        except Exception:  # no Service left without its Job
            try:
                self._delete_one(self.launcher.core.delete_namespaced_service, None)
            except Exception as exc:
                log.warning("kubernetes_service_not_deleted", job=self.name, error=str(exc))
            raise
        self._created, self._made = time.monotonic(), None
        log.info("kubernetes_job_created", job=self.name, namespace=ns)

    def delete(self) -> None:
        """Delete the Job and Service now (the pods' own grace period)."""
        self._delete(None)

    def _poll(self) -> Exit | None:
        if self._asked is not None and self._delete_pending():
            self._delete(self._asked[0])
        job = self._read_job()
        if job is None:
            if self._asked is not None:
                return Exit(None, "was deleted (cancelled)")
            error = JobError("ABORTED", f"{self.label} was deleted by someone else")
            return Exit(None, "was deleted", error)
        conditions = {c.type: c for c in (job.status.conditions or []) if c.status == "True"}
        if "Complete" in conditions:
            return Exit(0, "completed")
        if "Failed" in conditions:  # a pod that never started is the cause, if there is one
            pods = self._pods()
            return stuck(pods) or failed(self.label, conditions["Failed"], pods)
        # A pod is no older than its Job, and none is stuck while all are ready (running): the
        # pods are listed only when one could be.
        timeout = self.launcher.config.start_timeout_s
        if time.monotonic() - self._created < timeout:
            return None
        if (job.status.ready or 0) >= (job.spec.completions or 1):
            return None
        return stuck(self._pods(), timeout)

    def _delete_pending(self) -> bool:
        return self._asked is not None and self._asked != self._made

    def _delete(self, grace: int | None) -> None:
        """Delete the Job (foreground: its pods first) and the Service; gone is fine."""
        self._delete_one(self.launcher.batch.delete_namespaced_job, grace)
        self._delete_one(self.launcher.core.delete_namespaced_service, grace)
        self._made = (grace,)

    def _delete_one(self, delete: Any, grace: int | None) -> None:
        options = kube.V1DeleteOptions(propagation_policy="Foreground", grace_period_seconds=grace)
        _unless_missing(lambda: delete(self.name, self.namespace, body=options))

    def _read_job(self) -> Any:
        return _unless_missing(
            lambda: self.launcher.batch.read_namespaced_job(self.name, self.namespace)
        )

    def _pods(self) -> list[Any]:
        selector = f"{JOB_LABEL}={self.name}"
        pods = self.launcher.core.list_namespaced_pod(self.namespace, label_selector=selector)
        return sorted(pods.items, key=lambda p: p.metadata.name)


# Reading the cluster's verdict ---------------------------------------------------------------


def failed(label: str, condition: Any, pods: list[Any]) -> Exit:
    """A Job that failed: a pod killed by a signal (OOMKilled, exit 128+N, an eviction) is a
    worker killed by it (the supervisor may restart), whichever pod it was: the others then
    fail too (their rendezvous is lost), with exit codes of their own. Otherwise the first
    pod's exit code is the job's error."""
    why = f"{label} failed ({condition.reason}: {condition.message})"
    ends = [
        (pod.metadata.name, status.name, status.state.terminated)
        for pod in pods
        for status in pod.status.container_statuses or []
        if status.state and status.state.terminated and status.state.terminated.exit_code != 0
    ]
    for pod in pods:
        if pod.status.reason == "Evicted":
            return Exit(-9, f"was evicted with pod {pod.metadata.name} ({pod.status.message})")
    for name, _container, ended in ends:
        if ended.reason == "OOMKilled":
            return Exit(-9, f"was OOMKilled in pod {name} (its memory limit)")
    for name, _container, ended in ends:
        if ended.exit_code > 128:
            code = ended.exit_code
            return Exit(128 - code, f"was killed in pod {name} (exit code {code})")
    if not ends:
        return Exit(1, why, JobError("ABORTED", why))
    name, container, ended = ends[0]
    why += f"; pod {name}: {container} exited with code {ended.exit_code} ({ended.reason})"
    return Exit(1, why, JobError("ABORTED", why + "; see the pod's log"))


def stuck(pods: list[Any], timeout_s: float | None = None) -> Exit | None:
    """A pod unschedulable, or waiting on its image or container; with `timeout_s`, only one
    that has been so for that long: unschedulable since its condition's last transition,
    waiting since the pod's creation (a re-created pod gets its own time)."""
    after = "" if timeout_s is None else f" after {timeout_s:g} s"
    now = datetime.now(UTC)

    def long(since: datetime | None) -> bool:
        return timeout_s is None or since is None or (now - since).total_seconds() >= timeout_s

    for pod in pods:
        name, created = pod.metadata.name, pod.metadata.creation_timestamp
        for condition in pod.status.conditions or []:
            if condition.type != "PodScheduled" or condition.status != "False":
                continue
            if long(condition.last_transition_time or created):
                message = f"pod {name} is unschedulable{after}: {condition.message}"
                return Exit(1, message, JobError("RESOURCE_EXHAUSTED", message))
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting if status.state else None
            if waiting is not None and waiting.reason in STUCK_WAITING and long(created):
                message = f"pod {name} cannot start{after}: {waiting.reason}: {waiting.message}"
                return Exit(1, message, JobError("FAILED_PRECONDITION", message))
    return None


def _why(exc: ApiException) -> str:
    """The API server's own message (a Status object's `message`), else its body."""
    try:
        return str(json.loads(exc.body or "")["message"])
    except (ValueError, KeyError, TypeError):
        return str(exc.body or "")


def _unless_missing(call: Any) -> Any:
    """The call's result, or None when the object does not exist (404)."""
    try:
        return call()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def with_kubernetes(
    settings: TrainerSettings, local: Launcher, jobs_dir: Path, module: str
) -> Launcher:
    """The trainer's launcher when `kubernetes_jobs` is on: Kubernetes for multi-node jobs (or
    for all), `local` for the others."""
    assert settings.kubernetes_template is not None  # the settings require it
    config = KubernetesConfig(
        template=settings.kubernetes_template,
        image=settings.kubernetes_image,
        namespace=settings.kubernetes_namespace or default_namespace(),
        volume_claim=settings.kubernetes_volume_claim,
        jobs_dir=jobs_dir,
        module=module,
        start_timeout_s=settings.kubernetes_start_timeout_s,
    )
    config.template.read_text()  # a missing template fails the start, not the first job
    remote = KubernetesLauncher(config, api_client())
    takes = multi_node if settings.kubernetes_jobs == "multi_node" else lambda plan: True
    return Routed(local, remote, takes)
