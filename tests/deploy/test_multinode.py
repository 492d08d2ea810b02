"""deploy/k8s/multinode/: the indexed Job template of a training job on Kubernetes, as the
trainer renders it (`kubernetes_jobs.render`), its headless rendezvous Service and the trainer's
RBAC are valid Kubernetes objects (kubernetes-validate, the API's own schemas) and agree with
the launcher the supervisor runs (services/trainer/distributed.py). The other manifests of
deploy/k8s are checked against the schemas too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.trainer.distributed import launch_command
from services.trainer.kubernetes_jobs import RENDEZVOUS_PORT, KubernetesConfig, render

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MULTINODE = K8S / "multinode"
VERSION = "1.37"
JOBS_DIR = Path("/data/trainer/jobs")
FOLDER = JOBS_DIR / "team-a" / "j-1"
PLAN = {"device_type": "cuda", "devices_per_node": 8, "num_nodes": 2}
CONFIG = KubernetesConfig(
    template=MULTINODE / "job.yaml",
    image="registry.example.com/tlm:gpu",
    namespace="tlm",
    volume_claim="trainer-jobs-rwx",
    jobs_dir=JOBS_DIR,
    module="services.trainer.worker",
)


def rendered(plan: dict[str, Any] = PLAN, name: str = "tlm-j-1") -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in render(CONFIG, name, FOLDER, plan)}


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = docs["Job"]["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize(
    "plan",
    [PLAN, {"device_type": "cpu", "devices_per_node": 2, "num_nodes": 2}, {"num_nodes": 1}],
    ids=["gpus", "cpu-group", "one-process"],
)
def test_the_rendered_objects_are_valid_kubernetes_objects(plan: dict[str, Any]) -> None:
    docs = render(CONFIG, "tlm-j-1", FOLDER, plan)
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_validation_catches_a_broken_object() -> None:
    """The check above can fail: a Job whose completions is not a number is refused."""
    job = rendered()["Job"]
    job["spec"]["completions"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSION, strict=True)


def test_rbac_and_the_other_manifests_are_valid_kubernetes_objects() -> None:
    paths = [MULTINODE / "rbac.yaml", *sorted(K8S.glob("*.yaml"))]
    checked = 0
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "Kustomization":  # kustomize's own file, not an API object
                continue
            kubernetes_validate.validate(doc, VERSION, strict=True)
            checked += 1
    assert checked >= 15


def test_an_indexed_job_of_one_pod_per_node_that_never_retries_by_itself() -> None:
    spec = rendered()["Job"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == PLAN["num_nodes"]
    assert spec["backoffLimit"] == 0 and spec["template"]["spec"]["restartPolicy"] == "Never"
    for part in ("requests", "limits"):
        assert container(rendered())["resources"][part]["nvidia.com/gpu"] == 8
    cpu = rendered({"device_type": "cpu", "devices_per_node": 2, "num_nodes": 2})
    assert container(cpu)["resources"]["limits"]["nvidia.com/gpu"] == 0


def test_the_pods_run_the_supervisor_s_launch_command_with_c10d_rendezvous_at_pod_0() -> None:
    docs = rendered()
    expected = launch_command(
        "services.trainer.worker", FOLDER, PLAN, f"tlm-j-1-0.tlm-j-1:{RENDEZVOUS_PORT}", "tlm-j-1"
    )
    assert container(docs)["command"] == ["python", *expected[1:]]
    port = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}["rendezvous"]
    assert expected[expected.index("--rdzv-endpoint") + 1].endswith(f":{port}")
    assert container(docs)["image"] == CONFIG.image
    # One node: no rendezvous (a standalone group, or the plain worker for one process).
    one = container(rendered({"device_type": "cuda", "devices_per_node": 4}))["command"]
    assert "--standalone" in one and "--rdzv-endpoint" not in one
    lone = container(rendered({"num_nodes": 1}))["command"]
    assert lone == ["python", "-m", "services.trainer.worker", str(FOLDER)]


def test_every_pod_mounts_the_job_folders_where_the_trainer_has_them() -> None:
    pod = rendered()["Job"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(rendered())["volumeMounts"]}
    claim = volumes[mounts[str(JOBS_DIR)]]["persistentVolumeClaim"]["claimName"]
    assert claim == CONFIG.volume_claim
    assert FOLDER.is_relative_to(JOBS_DIR)


def test_the_headless_service_gives_each_pod_the_dns_name_the_rendezvous_uses() -> None:
    docs = rendered()
    service, pod = docs["Service"], docs["Job"]["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == "tlm-j-1"
    labels = pod["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    assert [p["port"] for p in service["spec"]["ports"]] == [RENDEZVOUS_PORT]


def test_rbac_is_namespaced_and_bound_to_the_trainer_s_service_account() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((MULTINODE / "rbac.yaml").read_text())}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding"}  # no ClusterRole
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trainer"}]
