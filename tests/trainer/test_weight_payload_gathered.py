"""A push built from weights in the form `Actor.gathered` returns them (the full state dict
without tied aliases, or LoRA's trainable tensors by their model names; here taken from an
unsharded model) carries what a push of the model itself carries, tensor for tensor, on the
CPU. The push of a 2-rank sharded actor against one process's is in test_rl_group_fsdp.py."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from services.trainer.distributed import unique_names
from services.trainer.rl.weight_sync import actor_payload

BASE = "models/tiny/revisions/r1"


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].device.type == "cpu" for k in a)


def test_a_gathered_full_state_pushes_as_the_model_does(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = unique_names(model)
    assert "lm_head.weight" not in names  # tied to the embedding: pushed once, by its first name
    gathered = {k: v.clone() for k, v in model.state_dict().items() if k in names}
    pushed = actor_payload(model, False, "jobs/j", 2, BASE, gathered)
    assert_same(pushed.tensors, actor_payload(model, False, "jobs/j", 2, BASE).tensors)
    assert pushed.header.tensor_count == len(names)


def test_gathered_adapters_push_as_peft_saves_them(tiny_model_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    pushed = actor_payload(model, True, "jobs/j", 1, BASE, trainable)
    alone = actor_payload(model, True, "jobs/j", 1, BASE)
    assert_same(pushed.tensors, alone.tensors)
    assert pushed.header.adapter_config_json == alone.header.adapter_config_json
    assert all(".default." not in k for k in pushed.tensors)  # peft's saved names
