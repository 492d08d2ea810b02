"""deploy/: the Dockerfile, compose file and Kubernetes manifests agree with the code.

No container engine or cluster runs here, so these tests parse the files and check them
against the settings classes, the `tlm` command and the proto service names.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer
import yaml
from setuptools import find_namespace_packages

from services.cli.health import SERVICE_NAMES
from services.cli.main import app
from services.common.settings import ServerSettings
from services.embedded import SERVICES
from services.gateway.settings import DEFAULT_HTTP_PORT, GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NAMES = ("registry", "reward", "rollout", "trainer", "deploy")  # the gRPC services
GATEWAY = "gateway"  # the OpenAI-compatible HTTP endpoint
# Every settings class by its TLM_<NAME>_ prefix.
SETTINGS: dict[str, type[ServerSettings]] = {
    **{name: cls for name, (_module, cls) in SERVICES.items()},
    GATEWAY: GatewaySettings,
}
GPU_SERVICES = {"rollout", "trainer"}
SCALED = {"reward", "rollout"}
GRPC_PORT = 50051
METRICS_PORT = 9090
# Variables that are not TLM settings but that the containers legitimately read.
OTHER_ENV = re.compile(r"^(POSTGRES_|MINIO_|AWS_|HF_|NVIDIA_|PIP_|PYTHON|PATH$)")


def _load(name: str) -> ModuleType:
    """deploy/<name>.py, which is not a package."""
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load("healthcheck")
requirements = _load("requirements")


# --- helpers -----------------------------------------------------------------------------------


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def compose() -> dict[str, Any]:
    (doc,) = load_all(DEPLOY / "compose.yaml")
    return doc


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key] = value
    return values


def dockerfile_env() -> dict[str, str]:
    """ENV key=value pairs of the Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            values.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return values


def dockerfile_json(instruction: str) -> list[list[str]]:
    return [
        json.loads(m)
        for m in re.findall(rf"^{instruction} (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M)
    ]


def setting_field(key: str) -> tuple[str, str] | None:
    """TLM_REWARD_REGISTRY_ADDRESS -> ('reward', 'registry_address'); None if not a TLM key."""
    m = re.fullmatch(r"TLM_([A-Z]+)_(\w+)", key)
    if m is None:
        return None
    return m.group(1).lower(), m.group(2).lower()


def assert_env_keys(keys: list[str], where: str, service: str | None = None) -> None:
    """Every key is a field of its service's settings class (or a known non-TLM variable)."""
    for key in keys:
        parsed = setting_field(key)
        if parsed is None:
            assert OTHER_ENV.match(key), f"{where}: {key} is neither TLM_<SERVICE>_... nor known"
            continue
        owner, field = parsed
        assert owner in SETTINGS, f"{where}: {key}: no service {owner!r}"
        if service is not None:
            assert owner == service, f"{where}: {key} is not a {service} setting"
        fields = SETTINGS[owner].model_fields
        assert field in fields, f"{where}: {key}: {SETTINGS[owner].__name__} has no {field!r}"


def settings_from(
    env: dict[str, str], service: str, monkeypatch: pytest.MonkeyPatch
) -> ServerSettings:
    """Construct the service's settings class from `env` alone, as its container would."""
    import os

    for key in list(os.environ):
        if key.startswith("TLM_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return SETTINGS[service]()


def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += load_all(path)
    return docs


def k8s(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def address_host(address: str) -> str:
    return address.removeprefix("dns:///").rsplit(":", 1)[0]


# --- every file ----------------------------------------------------------------------------------


def test_every_yaml_parses() -> None:
    paths = sorted(DEPLOY.rglob("*.yaml"))
    assert len(paths) >= 9
    for path in paths:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def test_service_names_match_the_protos() -> None:
    assert set(SERVICES) == set(NAMES)
    assert healthcheck.SERVICE_NAMES == SERVICE_NAMES


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_entrypoint_and_cmd_are_real_tlm_commands() -> None:
    assert dockerfile_json("ENTRYPOINT") == [["tlm"]]
    (cmd,) = dockerfile_json("CMD")
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert cmd[0] in commands and cmd[0] == "serve"
    assert cmd[1] in SERVICES


def test_dockerfile_stages_base_user_and_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages == ["builder", "base", "gpu", "cpu"]  # cpu last: the default target
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu$", text, re.M)
    assert re.search(r'^ARG EXTRAS=""$', text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] != "root" and not users[-1].startswith("0")
    match = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])$", text, re.M)
    assert match is not None
    healthcheck_cmd = json.loads(match.group(1))
    assert healthcheck_cmd == ["python", "/opt/tlm/healthcheck.py"]


def test_dockerfile_copies_only_paths_that_exist() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [
        src
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
        for src in line.split()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "services", "gen"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src


def test_dockerfile_env_is_settings() -> None:
    env = dockerfile_env()
    assert_env_keys(list(env), "Dockerfile")
    for name in NAMES:
        assert env[f"TLM_{name.upper()}_HOST"] == "0.0.0.0"
        assert env[f"TLM_{name.upper()}_DATA_DIR"] == "/data"


def test_package_includes_the_alembic_migrations() -> None:
    # pyproject's packages.find uses namespace discovery (the default), which is what puts the
    # __init__-less migrations folders into a non-editable install (`pip install .`).
    packages = find_namespace_packages(where=str(ROOT), include=["services*"])
    assert "services.registry.migrations" in packages
    assert "services.registry.migrations.versions" in packages
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "namespaces = false" not in pyproject
    assert '"*.mako"' in pyproject  # script.py.mako as package data


def test_requirements_script() -> None:
    base = requirements.requirements(str(ROOT / "pyproject.toml"))
    assert any(re.fullmatch(r"torch==[\d.]+", r) for r in base)
    assert "vllm" not in base
    assert "vllm==0.30.0" in requirements.requirements(str(ROOT / "pyproject.toml"), "vllm")
    with pytest.raises(SystemExit):
        requirements.requirements(str(ROOT / "pyproject.toml"), "nope")


# --- healthcheck.py ------------------------------------------------------------------------------


def test_healthcheck_target_parsing() -> None:
    pid1 = ["/opt/venv/bin/python", "/opt/venv/bin/tlm", "serve", "reward"]
    assert healthcheck.target([], pid1, {}) == ("reward", GRPC_PORT)
    assert healthcheck.target([], pid1, {"TLM_REWARD_PORT": "7000"}) == ("reward", 7000)
    assert healthcheck.target([], [*pid1, "--port", "7001"], {}) == ("reward", 7001)
    assert healthcheck.target([], ["tlm", "serve", "--port=7002", "trainer"], {}) == (
        "trainer",
        7002,
    )
    assert healthcheck.target(["rollout", "7003"], pid1, {}) == ("rollout", 7003)
    with pytest.raises(SystemExit):
        healthcheck.target([], ["tlm", "up"], {})


@pytest.mark.slow  # starts a service in a subprocess
def test_healthcheck_against_a_real_server(embedded: Any) -> None:
    port = embedded.running.port
    for name in NAMES:
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "healthcheck.py"), name, str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{name}: SERVING"


def test_healthcheck_fails_without_a_server() -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), "registry", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1


# --- compose -------------------------------------------------------------------------------------


def tlm_services() -> dict[str, dict[str, Any]]:
    return {name: compose()["services"][name] for name in NAMES}


def test_compose_services_and_commands() -> None:
    services = compose()["services"]
    assert set(services) == {*NAMES, GATEWAY, "postgres", "minio", "minio-init"}
    assert services["postgres"]["image"] == "postgres:15"
    assert "mc mb --ignore-existing local/tlm" in services["minio-init"]["command"][0]
    for name, svc in tlm_services().items():
        assert svc["command"] == ["serve", name]
        assert svc["image"] == ("tlm:gpu" if name in GPU_SERVICES else "tlm:cpu")
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["env_file"] == ["tlm.env"]


def test_compose_gpu_reservations_only_for_rollout_and_trainer() -> None:
    for name, svc in compose()["services"].items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {})
        devices = devices.get("devices", [])
        if name in GPU_SERVICES:
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
            assert svc["build"]["args"]["EXTRAS"] == "vllm"
        else:
            assert devices == [], name


def test_compose_healthchecks_and_dependencies() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        if name != "minio-init":
            assert "healthcheck" in svc, name
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep == "minio-init" else "service_healthy"
            assert cond == {"condition": want}, (name, dep)
    for name, svc in tlm_services().items():
        assert svc["healthcheck"]["test"] == ["CMD", "python", "/opt/tlm/healthcheck.py", name]
    assert set(services["registry"]["depends_on"]) == {"postgres", "minio-init"}
    assert set(services["trainer"]["depends_on"]) == {"registry", "reward", "rollout"}


def test_compose_volumes_are_declared() -> None:
    doc = compose()
    for name, svc in doc["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in doc["volumes"], (name, source)
    for name in NAMES:
        assert f"{name}-data:/data" in doc["services"][name]["volumes"]


def test_compose_env_keys_are_settings_fields() -> None:
    for name, svc in tlm_services().items():
        assert_env_keys(list(svc.get("environment", {})), f"compose {name}", service=name)
    assert_env_keys(list(env_file(DEPLOY / "tlm.env.example")), "tlm.env.example")


@pytest.mark.parametrize("name", NAMES)
def test_compose_env_builds_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = compose()["services"][name]
    env = dockerfile_env() | env_file(DEPLOY / "tlm.env.example") | svc.get("environment", {})
    settings = settings_from(env, name, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.port == GRPC_PORT
    assert settings.metrics_port == METRICS_PORT
    assert settings.api_keys and "*" in settings.api_keys.values()
    if name != "registry":
        assert settings.service_api_key in settings.api_keys
    for field, value in settings.model_dump().items():
        if field.endswith("_address"):
            assert value is not None, f"{name}.{field} unset"
            assert address_host(value) in NAMES, (name, field, value)
    if name == "registry":
        assert settings.database_url.startswith("postgresql+psycopg://")  # type: ignore[attr-defined]
        assert settings.blob_url == "s3://tlm/blobs"  # type: ignore[attr-defined]
        assert settings.s3_endpoint_url == "http://minio:9000"  # type: ignore[attr-defined]
    if name == "rollout":
        assert (settings.engine, settings.device) == ("vllm", "cuda")  # type: ignore[attr-defined]


# --- Kubernetes ----------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = load_all(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert kust["namespace"] == "tlm"
    assert set(k8s("Namespace")) == {"tlm"}


def test_k8s_deployments_and_services() -> None:
    deployments, services = k8s("Deployment"), k8s("Service")
    assert set(deployments) == {*NAMES, GATEWAY}
    assert set(services) == {*NAMES, GATEWAY}
    for name in NAMES:
        dep = deployments[name]
        c = container(dep)
        assert c["args"] == ["serve", name]
        assert c["image"] == ("tlm:gpu" if name in GPU_SERVICES else "tlm:cpu")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        svc = services[name]
        assert svc["spec"]["selector"] == labels
        assert {p["port"] for p in svc["spec"]["ports"]} == {GRPC_PORT, METRICS_PORT}
        pod_security = dep["spec"]["template"]["spec"]["securityContext"]
        assert pod_security["runAsNonRoot"] is True


def test_k8s_probes_are_grpc_on_the_right_service() -> None:
    for name in NAMES:
        c = container(k8s("Deployment")[name])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": GRPC_PORT, "service": SERVICE_NAMES[name]}, (
                name,
                probe,
            )


def test_k8s_gpus_only_for_rollout_and_trainer() -> None:
    for name, dep in k8s("Deployment").items():
        resources = container(dep)["resources"]
        for part in ("requests", "limits"):
            gpus = resources.get(part, {}).get("nvidia.com/gpu")
            assert gpus == (1 if name in GPU_SERVICES else None), (name, part)


def test_k8s_autoscaling_and_headless_services() -> None:
    hpas = k8s("HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == SCALED
    deployments = k8s("Deployment")
    for hpa in hpas.values():
        ref = hpa["spec"]["scaleTargetRef"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert (ref["kind"], ref["apiVersion"]) == ("Deployment", "apps/v1")
        assert "replicas" not in deployments[ref["name"]]["spec"]
        assert container(deployments[ref["name"]])["resources"]["requests"]["cpu"]
    for name, svc in k8s("Service").items():
        assert (svc["spec"].get("clusterIP") == "None") == (name in SCALED), name
    config = k8s("ConfigMap")["tlm-config"]["data"]
    for key, value in config.items():
        if key.endswith("_ADDRESS"):
            host = address_host(value)
            assert value.startswith("dns:///") == (host in SCALED), key


def test_k8s_trainer_work_dir_is_a_pvc() -> None:
    pvcs = k8s("PersistentVolumeClaim")
    spec = k8s("Deployment")["trainer"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    mounts = {
        m["mountPath"]: m["name"] for m in container(k8s("Deployment")["trainer"])["volumeMounts"]
    }
    claim = volumes[mounts[dockerfile_env()["TLM_TRAINER_DATA_DIR"]]]["persistentVolumeClaim"]
    assert claim["claimName"] in pvcs


def test_k8s_env_keys_are_settings_fields() -> None:
    config = k8s("ConfigMap")["tlm-config"]["data"]
    secret = k8s("Secret")["tlm-secrets"]["stringData"]
    assert_env_keys(list(config), "configmap")
    assert_env_keys(list(secret), "secret")
    for name, dep in k8s("Deployment").items():
        c = container(dep)
        assert c["envFrom"] == [{"configMapRef": {"name": "tlm-config"}}]
        assert_env_keys([e["name"] for e in c["env"]], f"k8s {name}", service=name)
        for e in c["env"]:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "tlm-secrets" and ref["key"] in secret, (name, ref)
    for name in (*NAMES, GATEWAY):
        assert config[f"TLM_{name.upper()}_METRICS_PORT"] == str(METRICS_PORT)


@pytest.mark.parametrize("name", NAMES)
def test_k8s_env_builds_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = k8s("ConfigMap")["tlm-config"]["data"]
    secret = k8s("Secret")["tlm-secrets"]["stringData"]
    c = container(k8s("Deployment")[name])
    env = dockerfile_env() | config | {e["name"]: secret[e["name"]] for e in c["env"]}
    settings = settings_from(env, name, monkeypatch)
    assert settings.host == "0.0.0.0" and settings.port == GRPC_PORT
    assert settings.metrics_port == METRICS_PORT
    assert settings.api_keys
    for field, value in settings.model_dump().items():
        if field.endswith("_address"):
            assert value is not None and address_host(value) in NAMES, (name, field, value)


def test_readme_documents_every_setting() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for name, settings_cls in SETTINGS.items():
        for field in settings_cls.model_fields:
            assert f"_{field.upper()}" in readme, f"deploy/README.md: {name}.{field} undocumented"


# --- the HTTP gateway ----------------------------------------------------------------------------


def test_gateway_in_compose(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = compose()["services"][GATEWAY]
    assert svc["command"] == ["serve", GATEWAY] and svc["image"] == "tlm:cpu"
    assert svc["healthcheck"]["test"] == ["CMD", "python", "/opt/tlm/healthcheck.py", GATEWAY]
    assert_env_keys(list(svc["environment"]), "compose gateway", service=GATEWAY)
    env = dockerfile_env() | env_file(DEPLOY / "tlm.env.example") | svc["environment"]
    settings = settings_from(env, GATEWAY, monkeypatch)
    assert settings.host == "0.0.0.0" and settings.port == DEFAULT_HTTP_PORT
    assert settings.service_api_key in settings.api_keys
    assert svc["ports"] == [f"{DEFAULT_HTTP_PORT}:{DEFAULT_HTTP_PORT}"]
    for field, value in settings.model_dump().items():
        if field.endswith("_address"):
            assert value is not None and address_host(value) in NAMES, (field, value)


def test_gateway_in_k8s(monkeypatch: pytest.MonkeyPatch) -> None:
    dep = k8s("Deployment")[GATEWAY]
    c = container(dep)
    assert c["args"] == ["serve", GATEWAY] and c["image"] == "tlm:cpu"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": DEFAULT_HTTP_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert k8s("Service")[GATEWAY]["spec"]["selector"] == labels
    config = k8s("ConfigMap")["tlm-config"]["data"]
    secret = k8s("Secret")["tlm-secrets"]["stringData"]
    env = dockerfile_env() | config | {e["name"]: secret[e["name"]] for e in c["env"]}
    settings = settings_from(env, GATEWAY, monkeypatch)
    assert settings.api_keys and settings.service_api_key in settings.api_keys
    assert settings.metrics_port == METRICS_PORT
    for field, value in settings.model_dump().items():
        if field.endswith("_address"):
            assert value is not None and address_host(value) in NAMES, (field, value)


def test_healthcheck_knows_the_gateway() -> None:
    pid1 = ["/opt/venv/bin/python", "/opt/venv/bin/tlm", "serve", GATEWAY]
    assert healthcheck.target([], pid1, {}) == (GATEWAY, DEFAULT_HTTP_PORT)
    assert healthcheck.http_status(1).startswith("UNAVAILABLE")
