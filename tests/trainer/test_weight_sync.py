"""The trainer side of policy sync, alone: which replicas a rollout address means, which steps
become registry revisions, and what a push of the actor carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.rollout.push import PIECE_BYTES
from services.trainer.params import GrpoParams, PpoParams, Sampling
from services.trainer.rl.actor import Objective
from services.trainer.rl.algos import LossConfig, LossType
from services.trainer.rl.controller import ControllerConfig
from services.trainer.rl.weight_sync import actor_payload, registry_steps, replica_addresses


@pytest.mark.parametrize(
    ("address", "replicas"),
    [
        ("ipv4:127.0.0.1:5001,127.0.0.1:5002", ["127.0.0.1:5001", "127.0.0.1:5002"]),
        ("ipv6:[::1]:5001,[::1]:5002", ["[::1]:5001", "[::1]:5002"]),
        ("127.0.0.1:5001", ["127.0.0.1:5001"]),
        ("dns:///localhost:5001", ["127.0.0.1:5001"]),  # each address the name resolves to
        ("unix:/tmp/rollout.sock", ["unix:/tmp/rollout.sock"]),
    ],
)
def test_an_address_means_every_replica_behind_it(address: str, replicas: list[str]) -> None:
    found = replica_addresses(address)
    if address.startswith("dns:"):  # localhost may also resolve to ::1
        assert set(replicas) <= set(found) <= {"127.0.0.1:5001", "[::1]:5001"}
    else:
        assert found == replicas


def test_registry_revisions_at_checkpoints_every_publish_every_and_the_end() -> None:
    default = registry_steps(publish_every=0, save_every=0, total_steps=5)
    assert [s for s in range(1, 6) if default(s)] == [5]
    checkpoints = registry_steps(publish_every=0, save_every=2, total_steps=5)
    assert [s for s in range(1, 6) if checkpoints(s)] == [2, 4, 5]
    both = registry_steps(publish_every=3, save_every=2, total_steps=7)
    assert [s for s in range(1, 8) if both(s)] == [2, 3, 4, 6, 7]


def test_a_push_carries_each_tensor_once_in_pieces_under_the_cap(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    payload = actor_payload(model, False, "jobs/j", 3, "models/tiny/revisions/r1")
    assert payload.header.version == "jobs/j@step-3"
    shared = {p.data_ptr() for p in model.state_dict().values()}
    assert payload.header.tensor_count == len(payload.tensors) == len(shared)
    messages = list(payload.messages())
    assert messages[0].HasField("header") and all(m.HasField("chunk") for m in messages[1:])
    assert max(len(m.chunk.data) for m in messages[1:]) <= PIECE_BYTES
    sent = sum(len(m.chunk.data) for m in messages[1:])
    assert sent == sum(t.numel() * t.element_size() for t in payload.tensors.values())


def test_an_adapter_push_carries_its_config_as_peft_saves_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    payload = actor_payload(model, True, "jobs/j", 1, "models/tiny/revisions/r1")
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    pushed = json.loads(payload.header.adapter_config_json)
    assert {k: pushed[k] for k in ("r", "lora_alpha", "peft_type")} == {
        k: saved[k] for k in ("r", "lora_alpha", "peft_type")
    }
    assert sorted(pushed["target_modules"]) == sorted(saved["target_modules"])
    on_disk = load_file(tmp_path / "adapter_model.safetensors")
    assert set(payload.tensors) == set(on_disk)
    assert all(torch.equal(payload.tensors[k], on_disk[k]) for k in on_disk)


@pytest.mark.parametrize(
    ("spec", "keep"),
    [
        (GrpoParams(), False),  # synchronous: the actor has not moved since its last push
        (GrpoParams(max_policy_lag=1), True),  # one step ahead
        (GrpoParams(sync_every=2), True),  # a step between publications
        (PpoParams(), False),
        (PpoParams(sync_every=3), True),
    ],
)
def test_a_job_keeps_its_last_push_when_the_actor_trains_on_while_it_is_served(
    spec: GrpoParams | PpoParams, keep: bool
) -> None:
    """What the GRPO and PPO recipes pass as `keep_pushed` (grpo.py), from their configs."""
    config = ControllerConfig(
        total_steps=4, prompts_per_step=1, group_size=2, sampling=Sampling(),
        objective=Objective(LossConfig(LossType.GRPO, 8)), sync_every=spec.sync_every,
        max_policy_lag=getattr(spec, "max_policy_lag", 0),
    )  # fmt: skip
    assert config.trains_while_served is keep
