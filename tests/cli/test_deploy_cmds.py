"""`tlm deployments ...`, `tlm models pull` and `tlm models merge` against the embedded
services (registry, rollout and deploy in one server) and the tiny model."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file

from services.clients.registry import RegistryClient
from services.devtools.server_thread import ServerThread
from tests.rollout.conftest import make_adapter
from tests.tlm_process import TLM
from tlm.registry.v1 import registry_pb2
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc


def tlm(server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TLM, *args, "--address", server.address], capture_output=True, text=True, timeout=300
    )


def push(server: ServerThread, model: str, folder: Path, count: int = 1) -> list[str]:
    async def main() -> list[str]:
        async with RegistryClient(server.address, insecure=True) as registry:
            await registry.create_model(model, exist_ok=True)
            return [
                (await registry.upload_model_revision(f"models/{model}", folder)).name
                for _ in range(count)
            ]

    return asyncio.run(main())


@pytest.mark.slow  # generates with the tiny model
def test_deployments_lifecycle(embedded: ServerThread, tiny_model_dir: Path) -> None:
    r1, r2 = push(embedded, "cli-dep", tiny_model_dir, 2)
    created = tlm(
        embedded,
        "deployments",
        "create",
        "web",
        "--model",
        "cli-dep@r1",
        "--max-tokens",
        "4",
        "--wait",
    )
    assert created.returncode == 0, created.stderr
    assert "READY" in created.stdout and r1 in created.stdout

    updated = tlm(embedded, "deployments", "update", "web", "--model", "cli-dep@r2", "--wait")
    assert updated.returncode == 0, updated.stderr
    assert f"serving {r2}" in updated.stdout and f"rollback to {r1}" in updated.stdout
    listed = tlm(embedded, "deployments", "list")
    assert "deployments/web" in listed.stdout and "READY" in listed.stdout

    rolled = tlm(embedded, "deployments", "rollback", "web", "--wait")
    assert rolled.returncode == 0, rolled.stderr
    shown = json.loads(tlm(embedded, "deployments", "show", "web").stdout)
    assert (shown["model_revision"], shown["previous_model_revision"]) == (r1, r2)
    assert shown["sampling_defaults"]["max_tokens"] == 4

    nothing = tlm(embedded, "deployments", "update", "web")
    assert nothing.returncode == 2 and "nothing to update" in nothing.stderr
    assert tlm(embedded, "deployments", "delete", "web").returncode == 0
    gone = tlm(embedded, "deployments", "show", "web")
    assert gone.returncode == 2 and "NOT_FOUND" in gone.stderr


def test_models_pull_writes_the_hf_folder(
    embedded: ServerThread, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (revision,) = push(embedded, "cli-pull", tiny_model_dir)
    out = tmp_path / "pulled"
    pulled = tlm(embedded, "models", "pull", "cli-pull@latest", str(out))
    assert pulled.returncode == 0, pulled.stderr
    assert revision in pulled.stdout
    expected = sorted(p.name for p in tiny_model_dir.iterdir())
    assert sorted(p.name for p in out.iterdir()) == expected
    assert (out / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()
    again = tlm(embedded, "models", "pull", "cli-pull", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.slow  # generates with the tiny model
def test_models_merge_pushes_full_weights_that_generate_as_base_plus_adapter(
    embedded: ServerThread, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (base,) = push(embedded, "cli-base", tiny_model_dir)
    adapter_dir = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    pushed = tlm(
        embedded, "models", "push", "cli-lora", str(adapter_dir), "--adapter-of", "cli-base@r1"
    )
    assert pushed.returncode == 0, pushed.stderr
    merged = tlm(embedded, "models", "merge", "cli-lora@r1", "--out", "cli-merged")
    assert merged.returncode == 0, merged.stderr

    async def revision() -> registry_pb2.ModelRevision:
        async with RegistryClient(embedded.address, insecure=True) as registry:
            return await registry.get_model_revision("models/cli-merged/revisions/latest")

    rev = asyncio.run(revision())
    assert rev.format == registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
    assert rev.lineage.base_model_revision == base
    assert rev.labels["merged_adapter"] == "models/cli-lora/revisions/r1"
    assert rev.metadata.tokenizer_present

    pulled = tmp_path / "merged"
    assert tlm(embedded, "models", "pull", "cli-merged", str(pulled)).returncode == 0
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(pulled / "model.safetensors")
    changed = [k for k in before if "q_proj.weight" in k and not before[k].equal(after[k])]
    assert changed, "merging changed no q_proj weight"

    stub = rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(embedded.address))

    def greedy(model: str, adapter: str = "") -> list[int]:
        request = rollout_pb2.GenerateRequest(
            prompts=[{"text": "The red cat"}],  # type: ignore[list-item]
            sampling=rollout_pb2.SamplingParams(temperature=0.0, max_tokens=8),
            model_revision=model,
            adapter_revision=adapter,
        )
        (c,) = [c for r in stub.Generate(request, timeout=120) for c in r.completions]
        return list(c.token_ids)

    assert greedy(rev.name) == greedy(base, "models/cli-lora/revisions/r1")
