"""One rank of PPO's learner group (`rl/ppo_learner.py` over `rl/group.py`) for
tests/trainer/test_ppo_group.py, under torchrun (or alone: one process, no group): the tiny
model's actor (full tuning, KL to the reference) and a new critic learn the fixed batch of
`actor_group` (5 sequences, the third masked) with fixed scores, 3 times: 2 epochs x 2
mini-batches of 3 and 2 samples, micro-batches of at most 2 (rank 0 trains 2 of the first
mini-batch's and the second's one, rank 1 one of the first's and none of the second's);
adaptive KL, reward whitening and an entropy bonus on. Between the second and third batch rank
0 restores the state it saved after the first (`state.pt`; LOAD and PPO_LOAD send its path and
every rank reads it): the third batch trains every rank's restored replicas. Rank 0 leads, the
other ranks follow; rank 0 writes each batch's metrics and the final actor and critic weights.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.trainer.ppo_group OUT
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.devtools.tiny_models import cached_tiny_model
from services.trainer.rl.group import Follower, follow, open_group
from tests.trainer.actor_group import fixed_batch
from tests.trainer.test_ppo_controller import job, models

SCORES = torch.tensor([1.0, -0.5, float("nan"), 2.0, 0.25])  # (N,) the third is not OK


def main(out: Path) -> None:
    group = open_group("cpu")  # None: one process
    # Both at lr 1e-3: Adam turns the float noise of a gradient that is 0 in exact arithmetic
    # (k_proj's bias: softmax ignores a shift) into steps of up to lr, which the ranks' summation
    # order changes (at the critic's usual 1e-2, 4e-5 apart after 12 steps).
    spec = job(
        kl_coef=0.1, target_kl=0.01, kl_horizon=100, entropy_coef=0.01, critic_learning_rate=1e-3
    )
    actor, learner = models(cached_tiny_model("test"), spec)
    learner.config = dataclasses.replace(
        learner.config, micro_batch_size=2, num_mini_batches=2, ppo_epochs=2, whiten_rewards=True
    )
    torch.manual_seed(0)  # the same on every rank
    with torch.no_grad():  # off the reference, so KL and its gradient are not 0
        for p in actor.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    actor.group = learner.group = group
    if group is not None and group.rank != 0:
        follow(Follower(actor, learner), group)
        return
    batch, _ = fixed_batch()
    metrics = [learner.train(actor, batch, SCORES)]
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "state.pt"  # as the controller's resume state: the followers read it there
    torch.save({"actor": actor.state_dict(), "learner": learner.state_dict()}, saved)
    metrics.append(learner.train(actor, batch, SCORES))
    state = torch.load(saved, weights_only=False)
    actor.load_state_dict(state["actor"], (saved, "actor"))
    learner.load_state_dict(state["learner"], (saved, "learner"))
    metrics.append(learner.train(actor, batch, SCORES))
    if group is not None:
        group.stop()
    weights = {f"actor.{k}": v for k, v in actor.model.state_dict().items()}
    weights |= {f"critic.{k}": v for k, v in learner.critic.model.state_dict().items()}
    save_file({k: v.detach().clone() for k, v in weights.items()}, out / "weights.safetensors")
    (out / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]))
