"""deploy/k8s/multinode/: the indexed Job template of a multi-node training job, its headless
rendezvous Service and the trainer's RBAC agree with each other and with the launcher the
supervisor runs (services/trainer/distributed.py)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import yaml

from services.trainer.distributed import launch_command

MULTINODE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "multinode"
FOLDER = "/data/trainer/jobs/team-a/j-1"
PLAN = {"devices_per_node": 8, "num_nodes": 2}


def rendered(job: str = "j-1") -> dict[str, dict[str, Any]]:
    template = string.Template((MULTINODE / "job.yaml").read_text())
    text = template.substitute(JOB=job, NODES=2, GPUS_PER_NODE=8, FOLDER=FOLDER)
    return {d["kind"]: d for d in yaml.safe_load_all(text)}


def test_the_template_parses_before_and_after_rendering() -> None:
    raw = list(yaml.safe_load_all((MULTINODE / "job.yaml").read_text()))
    assert [d["kind"] for d in raw] == ["Service", "Job"]
    assert set(rendered()) == {"Service", "Job"}


def test_an_indexed_job_of_one_pod_per_node_that_never_retries_by_itself() -> None:
    spec = rendered()["Job"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == PLAN["num_nodes"]
    assert spec["backoffLimit"] == 0 and spec["template"]["spec"]["restartPolicy"] == "Never"
    (container,) = spec["template"]["spec"]["containers"]
    for part in ("requests", "limits"):
        assert container["resources"][part]["nvidia.com/gpu"] == PLAN["devices_per_node"]


def test_the_pods_run_the_supervisor_s_launch_command_with_c10d_rendezvous_at_pod_0() -> None:
    docs = rendered()
    (container,) = docs["Job"]["spec"]["template"]["spec"]["containers"]
    expected = launch_command(
        "services.trainer.worker", Path(FOLDER), PLAN, "j-1-0.j-1:29400", "j-1"
    )
    assert container["command"] == ["python", *expected[1:]]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["rendezvous"]
    assert expected[expected.index("--rdzv-endpoint") + 1].endswith(f":{port}")


def test_the_headless_service_gives_each_pod_the_dns_name_the_rendezvous_uses() -> None:
    docs = rendered()
    service, pod = docs["Service"], docs["Job"]["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == "j-1"
    labels = pod["metadata"]["labels"]
    assert all(labels[k] == v for k, v in service["spec"]["selector"].items())
    assert [p["port"] for p in service["spec"]["ports"]] == [29400]


def test_rbac_lets_the_trainer_create_jobs_and_services_only_in_its_namespace() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((MULTINODE / "rbac.yaml").read_text())}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding"}  # no ClusterRole
    rules = {
        (tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"])
        for r in docs["Role"]["rules"]
    }
    assert {"create", "delete", "watch"} <= rules[(("batch",), ("jobs",))]
    assert "create" in rules[(("",), ("services",))]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trainer"}]
