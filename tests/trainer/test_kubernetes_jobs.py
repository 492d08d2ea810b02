"""Jobs on Kubernetes (`kubernetes_jobs.py`) driven by the supervisor, with the official client,
against a loopback stand-in for the API server (tests/kube_api.py: no kube-apiserver can be
installed here, so no real cluster ever ran these). The stand-in checks every object the
launcher creates against the Kubernetes schemas; the tests play the Job controller and the
kubelet (a Job's conditions, its pods' states) and the workers (events in the job folder).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import config as kubeconfig

from services.common.errors import FailedPrecondition
from services.trainer.distributed import CANCEL_FILE, RANK_ERRORS
from services.trainer.domain import Job, JobState, Method, Progress
from services.trainer.kubernetes_jobs import (
    KubernetesConfig,
    KubernetesLauncher,
    default_namespace,
    job_name,
    render,
)
from services.trainer.launchers import Routed, multi_node
from services.trainer.resources import Devices, estimate
from services.trainer.settings import TrainerSettings
from services.trainer.spec import DevicePlan, JobSpec, validate
from services.trainer.store import JobStore, new_job_id
from services.trainer.supervisor import Key, Supervisor, WorkerConfig, local_launcher
from services.trainer.worker_protocol import EVENTS_FILE
from tests.kube_api import FakeApi, kubeconfig_file, serving
from tests.waiting import until

ROOT = Path(__file__).resolve().parents[2]
NS = "tlm-test"
TWO_NODES = {"device_type": "cuda", "devices_per_node": 8, "num_nodes": 2, "strategy": "fsdp"}
SCRIPTED = "tests.trainer.scripted_worker"
BASE, DATA = "models/tiny/revisions/r1", "datasets/d/revisions/r1"
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512}


@pytest.fixture
def api() -> Iterator[FakeApi]:
    with serving() as api:
        yield api


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield store
    store.close()


def supervisor(
    store: JobStore,
    root: Path,
    api: FakeApi,
    max_restarts: int = 0,
    start_timeout_s: float = 60,
    api_outage_s: float = 60,
    gone_wait_s: float = 60,
) -> Supervisor:
    """A supervisor whose multi-node jobs go to `api`'s cluster, the others to this host."""
    config = WorkerConfig(root=root, max_running=2, module=SCRIPTED, poll_s=0.02)
    config = replace(config, max_restarts=max_restarts)
    client = kubeconfig.new_client_from_config(
        config_file=str(kubeconfig_file(root.parent / "kubeconfig", api.url, NS))
    )
    kube = replace(
        kube_config(root),
        start_timeout_s=start_timeout_s,
        api_outage_s=api_outage_s,
        gone_wait_s=gone_wait_s,
    )
    launcher = Routed(local_launcher(config), KubernetesLauncher(kube, client), multi_node)
    return Supervisor(store, config, lambda key: None, launcher)


def kube_config(root: Path) -> KubernetesConfig:
    return KubernetesConfig(
        template=ROOT / "deploy" / "k8s" / "multinode" / "job.yaml",
        image="tlm:gpu",
        namespace=NS,
        volume_claim="trainer-jobs-rwx",
        jobs_dir=root,
        module=SCRIPTED,
        poll_s=0.02,
    )


def create(store: JobStore, plan: dict[str, Any], output: str = "models/sleep") -> Key:
    spec = validate(JobSpec(Method.SFT, BASE, DATA))
    spec_dict = spec.to_dict() | {"output_model": output}
    job = Job(new_job_id(), "a", spec_dict, JobState.PENDING, plan, Progress(), datetime.now(UTC))
    store.create(job)
    return ("a", job.job_id)


def emit(folder: Path, kind: str, **data: Any) -> None:
    """What rank 0 writes into the shared job folder."""
    with (folder / EVENTS_FILE).open("a") as f:
        f.write(json.dumps({"kind": kind, "time": datetime.now(UTC).timestamp(), **data}) + "\n")


def pod(name: str, job: str, *, terminated: dict[str, Any] | None = None, **status: Any) -> Any:
    """A job pod as the kubelet reports it."""
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"tlm.dev/job": job}},
        "spec": {"containers": [{"name": "worker", "image": "tlm:gpu"}]},
        "status": status,
    }
    if terminated is not None:
        state = {"terminated": terminated}
        body["status"]["containerStatuses"] = [
            {
                "name": "worker",
                "image": "tlm:gpu",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": state,
            }
        ]
    return body


def failed_condition(reason: str = "BackoffLimitExceeded") -> dict[str, Any]:
    message = "Job has reached the specified backoff limit"
    return {
        "conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": message}]
    }


async def started(store: JobStore, api: FakeApi, key: Key, creates: int = 1) -> str:
    name = job_name(key[1])
    await until(
        lambda: store.get(*key).state is JobState.RUNNING and len(api.created("jobs")) >= creates
    )
    return name


async def submitted(
    store: JobStore, api: FakeApi, sup: Supervisor, output: str = "models/sleep"
) -> tuple[Key, str]:
    """A two-node job submitted to `sup`, once running: its key and its Kubernetes Job's name."""
    key = create(store, TWO_NODES, output)
    sup.submit(*key)
    return key, await started(store, api, key)


async def ended(store: JobStore, sup: Supervisor, key: Key) -> Job:
    await until(lambda: store.get(*key).state.terminal and sup.running == 0)
    return store.get(*key)


def job_folder(tmp_path: Path, key: Key) -> Path:
    return tmp_path / "jobs" / "a" / key[1]


def complete(api: FakeApi, folder: Path, name: str, revision: str = "m/r") -> None:
    """Rank 0 reports its result; the Job controller marks the Job complete."""
    emit(folder, "result", output_model_revision=revision, metrics={})
    api.set_job_status(NS, name, {"conditions": [{"type": "Complete", "status": "True"}]})


def assert_deleted(api: FakeApi, name: str) -> None:
    assert api.get("jobs", NS, name) is None and api.get("services", NS, name) is None


async def test_a_two_node_plan_creates_the_rendezvous_service_and_an_indexed_job(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    root = tmp_path / "jobs"
    sup = supervisor(store, root, api)
    key, name = await submitted(store, api, sup, output="models/out")
    (service,), (job,) = api.created("services"), api.created("jobs")
    assert service["metadata"]["name"] == job["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 2
    assert spec["template"]["spec"]["subdomain"] == name
    (container,) = spec["template"]["spec"]["containers"]
    folder = root / "a" / key[1]
    command = container["command"]
    assert command[:3] == ["python", "-m", "services.trainer.distributed"]
    assert command[command.index("--nnodes") + 1] == "2"
    assert command[command.index("--nproc-per-node") + 1] == "8"
    assert command[command.index("--rdzv-endpoint") + 1] == f"{name}-0.{name}:29400"
    assert command[command.index("--rdzv-id") + 1] == name
    assert command[-3:] == ["-m", SCRIPTED, str(folder)]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {
        v["name"]: v.get("persistentVolumeClaim") for v in spec["template"]["spec"]["volumes"]
    }
    assert claims[mounts[str(root)]] == {"claimName": "trainer-jobs-rwx"}
    messages = [e.data.get("message") for e in store.events(*key, 0)]
    assert f"worker started (Kubernetes Job {NS}/{name})" in messages
    # The workers report through the shared folder; the Job completes: the job succeeds.
    emit(folder, "started", total_steps=2)
    complete(api, folder, name, "models/out/revisions/r1")
    await ended(store, sup, key)
    assert store.get(*key).state is JobState.SUCCEEDED
    assert_deleted(api, name)


async def test_a_one_node_job_still_runs_on_this_host(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api)
    key = create(store, {"device_type": "cpu", "devices_per_node": 1}, output="models/succeed")
    sup.submit(*key)
    await ended(store, sup, key)
    assert store.get(*key).state is JobState.SUCCEEDED and not api.calls


async def test_a_failed_job_condition_fails_the_job_with_the_pod_s_reason(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api)
    key, name = await submitted(store, api, sup)
    terminated = {"exitCode": 2, "reason": "Error"}
    api.add_pod(NS, pod(f"{name}-1-abcde", name, terminated=terminated, phase="Failed"))
    api.set_job_status(NS, name, failed_condition())
    job = await ended(store, sup, key)
    assert job.state is JobState.FAILED and job.error is not None
    assert job.error.code == "ABORTED"
    assert "BackoffLimitExceeded" in job.error.message
    assert f"pod {name}-1-abcde: worker exited with code 2" in job.error.message
    assert_deleted(api, name)


async def test_the_workers_own_error_wins_over_the_job_s_condition(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api)
    key, name = await submitted(store, api, sup)
    folder = job_folder(tmp_path, key)
    emit(folder, "error", code="INVALID_ARGUMENT", message="rank 3: dataset row 7 is invalid")
    api.set_job_status(NS, name, failed_condition())
    error = (await ended(store, sup, key)).error
    assert error is not None and error.message == "rank 3: dataset row 7 is invalid"


async def test_an_oom_killed_pod_restarts_the_job_then_fails_it_naming_the_kill(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api, max_restarts=1)
    key = create(store, TWO_NODES)
    sup.submit(*key)
    for attempt in (1, 2):
        name = await started(store, api, key, creates=attempt)
        oom = {"exitCode": 137, "reason": "OOMKilled"}
        api.add_pod(NS, pod(f"{name}-0-x{attempt}", name, terminated=oom, phase="Failed"))
        api.set_job_status(NS, name, failed_condition())
        if attempt == 1:  # deleted, then created again for the restart
            await until(lambda: len(api.created("jobs")) == 2)
    job = await ended(store, sup, key)
    assert job.state is JobState.FAILED and job.error is not None
    assert job.error.message.startswith(f"the worker was OOMKilled in pod {name}-0-x2")
    assert "again after 1 restarts" in job.error.message
    # Each attempt: delete what a previous one left (nothing: 404), create, delete when it ends.
    each = [("DELETE", "jobs"), ("DELETE", "services"), ("POST", "services"), ("POST", "jobs")]
    each += [("DELETE", "jobs"), ("DELETE", "services")]
    assert writes(api) == each * 2
    assert {c.name for c in api.calls if c.method == "DELETE"} == {name}


def writes(api: FakeApi) -> list[tuple[str, str]]:
    return [(c.method, c.resource) for c in api.calls if c.method != "GET"]


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        (
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
            "RESOURCE_EXHAUSTED",
            "is unschedulable after 0 s: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        ),
        (
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "worker",
                        "image": "tlm:gpu",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {
                            "waiting": {
                                "reason": "ImagePullBackOff",
                                "message": "Back-off pulling image tlm:gpu",
                            }
                        },
                    }
                ],
            },
            "FAILED_PRECONDITION",
            "cannot start after 0 s: ImagePullBackOff: Back-off pulling image tlm:gpu",
        ),
    ],
    ids=["unschedulable", "image-pull"],
)
async def test_a_pod_that_cannot_start_fails_the_job_with_its_reason(
    store: JobStore, tmp_path: Path, api: FakeApi, status: dict[str, Any], code: str, words: str
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api, start_timeout_s=0)
    key, name = await submitted(store, api, sup)
    api.add_pod(NS, pod(f"{name}-1-abcde", name) | {"status": status})
    job = await ended(store, sup, key)
    assert job.state is JobState.FAILED and job.error is not None
    assert job.error.code == code and job.error.message == f"pod {name}-1-abcde {words}"
    assert_deleted(api, name)


async def test_cancel_writes_the_cancel_file_and_deletes_the_job_and_service(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api)
    key, name = await submitted(store, api, sup)
    store.transition(*key, JobState.CANCELLING, "cancel requested", cancel_requested=True)
    sup.cancel(*key)
    await ended(store, sup, key)
    assert store.get(*key).state is JobState.CANCELLED
    assert (job_folder(tmp_path, key) / CANCEL_FILE).exists()
    assert_deleted(api, name)
    created = max(i for i, c in enumerate(api.calls) if c.method == "POST")
    after = [c for c in api.calls[created:] if c.method == "DELETE"]
    assert {(c.resource, c.name) for c in after} == {("jobs", name), ("services", name)}
    assert all(c.body["propagationPolicy"] == "Foreground" for c in after)


async def test_an_api_server_outage_is_waited_out(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api)
    key, name = await submitted(store, api, sup, output="models/out")
    api.reads_fail = True
    failing = len(api.calls)
    await until(lambda: sum(c.verb == "get" for c in api.calls[failing:]) >= 5)
    assert store.get(*key).state is JobState.RUNNING
    api.reads_fail = False
    complete(api, job_folder(tmp_path, key), name)
    await ended(store, sup, key)
    assert store.get(*key).state is JobState.SUCCEEDED


async def test_an_api_server_gone_for_longer_than_the_outage_limit_fails_the_job(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api, api_outage_s=0)
    key, name = await submitted(store, api, sup)
    api.reads_fail = True
    error = (await ended(store, sup, key)).error
    assert store.get(*key).state is JobState.FAILED and error is not None
    assert error.code == "UNAVAILABLE"
    assert error.message.startswith(f"Kubernetes Job {NS}/{name} could not be read for 0 s")
    api.reads_fail = False
    assert api.get("jobs", NS, name) is None  # deleted all the same (deletes still answer)


async def test_a_job_the_cluster_refuses_fails_saying_why(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    api.forbid_create = True
    sup = supervisor(store, tmp_path / "jobs", api)
    key = create(store, TWO_NODES)
    sup.submit(*key)
    error = (await ended(store, sup, key)).error
    assert store.get(*key).state is JobState.FAILED and error is not None
    assert error.code == "FAILED_PRECONDITION"
    assert error.message.startswith(f"could not create Kubernetes Job {NS}/{job_name(key[1])}")
    assert "403 Forbidden" in error.message and "cannot create resource" in error.message


async def test_a_kill_in_any_pod_restarts_the_job_though_another_pod_exited_first_in_name_order(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    """Pod 1 OOMKilled; pod 0 then exits 1 (its rendezvous lost): a kill, not pod 0's error."""
    sup = supervisor(store, tmp_path / "jobs", api, max_restarts=1)
    key, name = await submitted(store, api, sup, output="models/out")
    lost = {"exitCode": 1, "reason": "Error"}
    api.add_pod(NS, pod(f"{name}-0-a", name, terminated=lost, phase="Failed"))
    oom = {"exitCode": 137, "reason": "OOMKilled"}
    api.add_pod(NS, pod(f"{name}-1-b", name, terminated=oom, phase="Failed"))
    api.set_job_status(NS, name, failed_condition())
    await started(store, api, key, creates=2)
    messages = [e.data.get("message", "") for e in store.events(*key, 0)]
    assert any(f"was OOMKilled in pod {name}-1-b" in m and "restarting" in m for m in messages)
    complete(api, job_folder(tmp_path, key), name)
    await ended(store, sup, key)
    assert store.get(*key).state is JobState.SUCCEEDED


async def test_the_start_timeout_counts_from_each_pod_s_own_start(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    """A pod the Job controller re-created long after the Job (while an autoscaler adds a node)
    is briefly unschedulable: not yet a failure. Once every pod is ready, no pod is listed."""
    sup = supervisor(store, tmp_path / "jobs", api, start_timeout_s=3)
    key, name = await submitted(store, api, sup, output="models/out")
    await until(lambda: pod_lists(api) > 0)  # the Job is older than the timeout
    # Whole seconds, rounded up: the pod's 3 s start from now at the earliest.
    now = (datetime.now(UTC) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    unschedulable = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/4 nodes are available; pod triggered scale-up",
                "lastTransitionTime": now,
            }
        ],
    }
    fresh = pod(f"{name}-1-new", name) | {"status": unschedulable}
    fresh["metadata"]["creationTimestamp"] = now
    api.add_pod(NS, fresh)
    seen = pod_lists(api)
    await until(lambda: pod_lists(api) >= seen + 3)  # well within its 3 s
    assert store.get(*key).state is JobState.RUNNING
    api.set_job_status(NS, name, {"active": 2, "ready": 2})
    listed, reads = pod_lists(api) + 1, job_reads(api)  # + one poll already under way
    await until(lambda: job_reads(api) >= reads + 5)
    assert pod_lists(api) <= listed
    complete(api, job_folder(tmp_path, key), name)
    await ended(store, sup, key)
    assert store.get(*key).state is JobState.SUCCEEDED


def pod_lists(api: FakeApi) -> int:
    return sum(c.resource == "pods" and c.verb == "list" for c in api.calls)


def job_reads(api: FakeApi) -> int:
    return sum(c.resource == "jobs" and c.verb == "get" for c in api.calls)


async def test_a_start_clears_a_previous_attempt_s_cancel_and_rank_errors(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    """The supervisor clears them, not the agents: a pod starting late must not erase a cancel
    (distributed.py)."""
    sup = supervisor(store, tmp_path / "jobs", api)
    key = create(store, TWO_NODES)
    folder = job_folder(tmp_path, key)
    (folder / RANK_ERRORS).mkdir(parents=True)
    (folder / RANK_ERRORS / "3.json").write_text("{}")
    (folder / CANCEL_FILE).touch()
    sup.submit(*key)
    await started(store, api, key)
    assert not (folder / CANCEL_FILE).exists() and not (folder / RANK_ERRORS).exists()
    await sup.stop()


async def test_a_job_the_cluster_refuses_leaves_no_service_behind(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    api.forbid_jobs = True
    sup = supervisor(store, tmp_path / "jobs", api)
    key = create(store, TWO_NODES)
    sup.submit(*key)
    error = (await ended(store, sup, key)).error
    assert error is not None and error.code == "FAILED_PRECONDITION"
    assert "403 Forbidden" in error.message
    created = [("DELETE", "jobs"), ("DELETE", "services"), ("POST", "services"), ("POST", "jobs")]
    assert writes(api) == [*created, ("DELETE", "services")]
    assert api.get("services", NS, job_name(key[1])) is None


async def test_a_previous_attempt_that_is_not_deleted_in_time_fails_the_job_as_unavailable(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    sup = supervisor(store, tmp_path / "jobs", api, gone_wait_s=0)
    key = create(store, TWO_NODES)
    name = job_name(key[1])
    _service, job = render(kube_config(tmp_path / "jobs"), name, tmp_path, TWO_NODES)
    job["metadata"]["finalizers"] = ["tlm.dev/test"]  # deleted, but it stays
    api.add("jobs", NS, job)
    sup.submit(*key)
    error = (await ended(store, sup, key)).error
    assert error is not None and error.code == "UNAVAILABLE"
    assert error.message == (
        f"could not create Kubernetes Job {NS}/{name}: a previous attempt is still being deleted"
    )
    assert not api.created("jobs")


async def test_a_trainer_stopping_while_a_job_is_created_deletes_it(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    api.hold_job_creates = threading.Event()
    sup = supervisor(store, tmp_path / "jobs", api)
    key = create(store, TWO_NODES)
    name = job_name(key[1])
    sup.submit(*key)
    await until(lambda: api.created("services"))
    stopping = asyncio.ensure_future(sup.stop())
    await until(lambda: sup._stopping)
    api.hold_job_creates.set()  # the create the stop interrupted goes through
    await stopping
    await until(lambda: api.created("jobs"))
    assert_deleted(api, name)


async def test_a_restarted_trainer_deletes_the_jobs_it_will_not_resume(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    """A job left RUNNING before any checkpoint (it FAILS) and one left CANCELLING (CANCELLED):
    their Jobs and Services, which the previous trainer process left, go."""
    root = tmp_path / "jobs"
    keys = [create(store, TWO_NODES), create(store, TWO_NODES)]
    for key in keys:
        store.transition(*key, JobState.RUNNING, "worker started")
        service, job = render(kube_config(root), job_name(key[1]), root, TWO_NODES)
        api.add("services", NS, service)
        api.add("jobs", NS, job)
    store.transition(*keys[1], JobState.CANCELLING, "cancel requested", cancel_requested=True)
    sup = supervisor(store, root, api)
    sup.recover()
    assert [store.get(*k).state for k in keys] == [JobState.FAILED, JobState.CANCELLED]
    await until(lambda: not api.objects)
    await sup.stop()
    deleted = {(c.resource, c.name) for c in api.calls if c.method == "DELETE"}
    names = {job_name(k[1]) for k in keys}
    assert deleted == {(r, n) for r in ("jobs", "services") for n in names}


async def test_rbac_grants_exactly_the_calls_the_launcher_makes(
    store: JobStore, tmp_path: Path, api: FakeApi
) -> None:
    """Every call a job's life makes (create, follow with pods listed, cancel, clean up),
    against the Role in deploy/k8s/multinode/rbac.yaml."""
    sup = supervisor(store, tmp_path / "jobs", api, start_timeout_s=0)  # pods listed at once
    key = create(store, TWO_NODES)
    sup.submit(*key)
    await started(store, api, key)
    await until(lambda: any(c.resource == "pods" for c in api.calls))
    store.transition(*key, JobState.CANCELLING, "cancel requested", cancel_requested=True)
    sup.cancel(*key)
    await ended(store, sup, key)
    used = {(c.group, c.resource, c.verb) for c in api.calls}
    rbac = ROOT / "deploy" / "k8s" / "multinode" / "rbac.yaml"
    (role,) = [d for d in yaml.safe_load_all(rbac.read_text()) if d["kind"] == "Role"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert used == granted


def test_the_namespace_defaults_to_the_kubeconfig_context_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig_file(tmp_path / "k", "http://x", "team-ns")))
    assert default_namespace() == "team-ns"
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert default_namespace() == "default"


def test_a_multi_node_plan_needs_kubernetes_and_is_refused_naming_the_field(
    tmp_path: Path,
) -> None:
    off = TrainerSettings(data_dir=tmp_path)
    on = TrainerSettings(
        data_dir=tmp_path,
        kubernetes_jobs="multi_node",
        kubernetes_image="tlm:gpu",
        kubernetes_template=tmp_path / "job.yaml",
    )
    plan = DevicePlan(device_type="cuda", devices_per_node=8, num_nodes=2)
    spec = validate(JobSpec(Method.SFT, BASE, DATA, resources=plan, explicit_resources=True))
    gpus = Devices(cuda_count=8, cuda_memory_bytes=80 * 2**30, cpu_memory_bytes=2**40)
    with pytest.raises(FailedPrecondition) as err:
        estimate(spec, 1000, TINY, replace(gpus, nodes=off.max_nodes()))
    assert [v.field for v in err.value.violations] == ["spec.resources.explicit.num_nodes"]
    assert "asks for 2 nodes; this trainer has 1" in err.value.message
    assert "TLM_TRAINER_KUBERNETES_JOBS" in err.value.message
    fits = estimate(spec, 1000, TINY, replace(gpus, nodes=on.max_nodes()))
    assert (fits.plan.num_nodes, fits.plan.devices_per_node) == (2, 8)
    with pytest.raises(ValueError, match="kubernetes_image and kubernetes_template"):
        TrainerSettings(data_dir=tmp_path, kubernetes_jobs="all")
