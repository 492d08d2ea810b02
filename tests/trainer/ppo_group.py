"""One rank of PPO's learner group (`rl/ppo_learner.py` over `rl/group.py`) for
tests/trainer/test_ppo_group.py, under torchrun (or alone: one process, no group): the tiny
model's actor (full tuning, KL to the reference) and a new critic learn the fixed batch of
`actor_group` (5 sequences, the third masked) with fixed scores, 3 times: 2 epochs x 2
mini-batches of 3 and 2 samples, micro-batches of at most 2 (rank 0 trains 2 of the first
mini-batch's and the second's one, rank 1 one of the first's and none of the second's);
adaptive KL, reward whitening and an entropy bonus on. Between the second and third batch rank
0 restores the state it saved after the first (`state.pt`; LOAD and PPO_LOAD send its path and
every rank reads it): the third batch trains every rank's restored replicas. Rank 0 leads, the
other ranks follow; rank 0 writes each batch's metrics and the final actor and critic weights
(the trainable ones: LoRA's adapters and the critic's head, the full model's every weight).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.trainer.ppo_group \
        OUT [--fsdp] [--lora] [--resume STATE]

`--fsdp` shards the actor, its reference and the critic (FSDP2) over the group (only rank 0
builds them with weights, as in `actor_group`): a rank short of
micro-batches pads with zero-weight passes, and the resume state names sharded checkpoints
(DCP, under `OUT/checkpoints`); the final weights are gathered to rank 0 (the actor's, as it is
published) or read back from the critic's last checkpoint. `--lora` trains LoRA adapters on
both. `--resume STATE` restores a state file (on any number of ranks: every rank reads it) and
learns the batch once. A sharded learner first refuses a replica's resume state
(`refused.json`: the message).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from services.trainer.distributed import end_rank, unique_names
from services.trainer.grpo import Placement
from services.trainer.ppo import ppo_config
from services.trainer.rl.actor import Actor, build_actor
from services.trainer.rl.critic import build_critic
from services.trainer.rl.group import Follower, follow, open_group
from services.trainer.rl.ppo_learner import PpoLearner
from services.trainer.spec import LoraParams
from tests.trainer.actor_group import base_model, fixed_batch
from tests.trainer.test_ppo_controller import job

SCORES = torch.tensor([1.0, -0.5, float("nan"), 2.0, 0.25])  # (N,) the third is not OK


def main(args: argparse.Namespace) -> None:
    out: Path = args.out
    group = open_group("cpu")  # None: one process
    # Both at lr 1e-3: Adam turns the float noise of a gradient that is 0 in exact arithmetic
    # (k_proj's bias: softmax ignores a shift) into steps of up to lr, which the ranks' summation
    # order changes (at the critic's usual 1e-2, 4e-5 apart after 12 steps).
    spec = job(
        kl_coef=0.1, target_kl=0.01, kl_horizon=100, entropy_coef=0.01, critic_learning_rate=1e-3
    )
    if args.lora:
        spec = dataclasses.replace(spec, lora=LoraParams(r=4, alpha=8))
    where = Placement.of({"strategy": "fsdp" if args.fsdp else "ddp"}, group)  # as PPO's
    model = base_model(out, where.built_on)
    actor = build_actor(model, spec, "fp32", where.built_on)
    critic = build_critic(model, spec, "fp32", where.built_on)
    torch.manual_seed(0)  # the same on every rank
    with torch.no_grad():  # off the reference, so KL and its gradient are not 0
        for p in actor.model.parameters():  # (no-ops on "meta": those ranks get rank 0's)
            p.add_(torch.randn_like(p) * 0.02)
    checkpoints = (args.resume.parent if args.resume else out) / "checkpoints"
    for m in (actor, critic):
        m.group, m.checkpoints = group, checkpoints
        if where.sharded:
            m.shard(where.device)
    actor.configure_optimizer(spec, "fp32", 100)
    critic.configure_optimizer(spec, spec.params.critic_learning_rate, "fp32", 100)
    config = dataclasses.replace(
        ppo_config(spec), micro_batch_size=2, num_mini_batches=2, ppo_epochs=2, whiten_rewards=True
    )
    learner = PpoLearner(critic, config)
    learner.group = group
    if group is not None and group.rank != 0:
        follow(Follower(actor, learner), group)
        return
    out.mkdir(parents=True, exist_ok=True)
    if critic.sharded:  # a replica's state (its weights whole) is refused, before any collective
        try:
            learner.load_state_dict({"critic": {"trainable": {}}}, (out / "state.pt", "learner"))
        except ValueError as refused:
            (out / "refused.json").write_text(json.dumps(str(refused)))
    batch, _ = fixed_batch()
    metrics = []
    if args.resume:
        restore(actor, learner, args.resume)
    else:
        metrics.append(learner.train(actor, batch, SCORES))
        saved = out / "state.pt"  # as the controller's resume state: the followers read it there
        torch.save({"actor": actor.state_dict(), "learner": learner.state_dict()}, saved)
        metrics.append(learner.train(actor, batch, SCORES))
        restore(actor, learner, saved)
    policy_weights(actor)  # as a sync pushes it: the batch's new weights are gathered again
    metrics.append(learner.train(actor, batch, SCORES))
    policy = policy_weights(actor)
    critic_state = critic.state_dict()  # sharded: every rank writes its shards
    if group is not None:
        group.stop()
    weights = {f"actor.{k}": v for k, v in policy.items()}
    weights |= {f"critic.{k}": v for k, v in critic_weights(critic_state, checkpoints).items()}
    save_file({k: v.detach().clone() for k, v in weights.items()}, out / "weights.safetensors")
    (out / "metrics.json").write_text(json.dumps(metrics))
    sharded = any(type(p).__name__ == "DTensor" for p in critic.model.parameters())
    (out / "sharded.json").write_text(json.dumps(sharded))


def restore(actor: Actor, learner: PpoLearner, saved: Path) -> None:
    state = torch.load(saved, weights_only=False)
    actor.load_state_dict(state["actor"], (saved, "actor"))
    learner.load_state_dict(state["learner"], (saved, "learner"))


def policy_weights(actor: Actor) -> dict[str, torch.Tensor]:
    """The policy as it is published: gathered to rank 0 when sharded (LoRA's adapters, or the
    full weights without tied aliases); a replica's, the same tensors."""
    if actor.sharded:
        return actor.gathered()
    if actor.lora:
        return {n: p for n, p in actor.model.named_parameters() if p.requires_grad}
    names = unique_names(actor.model)
    return {k: v for k, v in actor.model.state_dict().items() if k in names}


def critic_weights(state: dict[str, Any], checkpoints: Path) -> dict[str, torch.Tensor]:
    """The critic's trainable weights: in its resume state, or its sharded checkpoint's."""
    if "shards" not in state:
        return dict(state["trainable"])
    whole = checkpoints / "critic-whole.pt"
    dcp_to_torch_save(checkpoints / state["shards"], whole)
    return dict(torch.load(whole, weights_only=False)["model"])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--resume", type=Path)
    main(parser.parse_args())
    end_rank(0)  # without the finalization that can abort a rank (distributed.py)
