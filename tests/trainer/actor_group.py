"""One rank of GRPO's actor group (`rl/group.py`) for tests/trainer/test_rl_group.py, under
torchrun (or alone: one process, no group): the tiny model's actor (full tuning, KL to the
reference) takes a fixed sequence of updates on one fixed batch of 5 sequences, one of them
masked: every loss type, micro-batches that do not divide evenly over 2 ranks (3 micro-batches
of at most 2: rank 0 trains 2, rank 1 one), an update whose one micro-batch leaves rank 1 no
share, and 2 iterations. Rank 0 leads, the other ranks follow; rank 0 writes each update's
metrics and the final weights.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.trainer.actor_group OUT
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
from services.trainer.grpo import loss_config
from services.trainer.rl import LossType
from services.trainer.rl.actor import Objective, build_actor
from services.trainer.rl.batch import Sample, TokenBatch, make_batch
from services.trainer.rl.group import follow, open_group
from tests.trainer.test_rl_controller import job

# (loss_type, micro_batch_size (0: all), num_iterations) of each update, in order.
CASES = [("grpo", 2, 1), ("dr_grpo", 2, 1), ("dapo", 2, 2), ("bnpo", 2, 1), ("grpo", 0, 1)]


def fixed_batch() -> tuple[TokenBatch, torch.Tensor]:
    """5 samples of different prompt and completion lengths, the third masked (unscored), and
    random advantages on the loss tokens. (N, T) advantages."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(5):
        prompt = torch.randint(1, 500, (1 + i % 3,), generator=g).tolist()
        completion = torch.randint(1, 500, (1 + (2 * i) % 5,), generator=g).tolist()
        samples.append(Sample(prompt, completion, [-1.0] * len(completion), "", "base"))
    batch = make_batch(samples, torch.tensor([True, True, False, True, True]), 0)
    return batch, torch.randn(batch.mask.shape, generator=g) * batch.mask


def main(out: Path) -> None:
    group = open_group("cpu")  # None: one process
    spec = job(lr=1e-3, beta=0.1)
    actor = build_actor(cached_tiny_model("test"), spec, "fp32", "cpu")
    actor.configure_optimizer(spec, "fp32", 100)
    torch.manual_seed(0)  # the same on every rank
    with torch.no_grad():  # off the reference, so KL and its gradient are not 0
        for p in actor.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    actor.group = group
    if group is not None and group.rank != 0:
        follow(actor, group)
        return
    batch, advantages = fixed_batch()
    metrics = []
    for loss_type, micro, iterations in CASES:
        loss = dataclasses.replace(loss_config(spec.params), loss_type=LossType(loss_type))
        objective = Objective(loss, num_iterations=iterations, micro_batch_size=micro)
        metrics.append(actor.update(batch, advantages, objective))
    if group is not None:
        group.stop()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in actor.model.state_dict().items()}
    save_file(state, out / "weights.safetensors")
    (out / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]))
