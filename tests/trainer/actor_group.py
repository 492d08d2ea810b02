"""One rank of GRPO's actor group (`rl/group.py`) for tests/trainer/test_rl_group.py and
test_rl_group_fsdp.py, under torchrun (or alone: one process, no group): the tiny model's actor
(KL to the reference) takes a fixed sequence of updates on one fixed batch of 5 sequences, one
of them masked: every loss type, micro-batches that do not divide evenly over 2 ranks (3
micro-batches of at most 2: rank 0 trains 2, rank 1 one), an update whose one micro-batch
leaves rank 1 no share, and 2 iterations. Before each update rank 0 takes the reference KL of
the batch (`reference_kl`, 2 sequences per pass); at the end it exports the policy (`export/`)
and builds the push of a sync from it as GRPO's publisher does (`pushed.safetensors`). Rank 0
leads, the other ranks follow; rank 0 writes each update's metrics and the final weights.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.trainer.actor_group \
        OUT [--fsdp] [--lora] [--save-at K] [--resume STATE]

`--fsdp` shards the actor and its reference (FSDP2) over the group: only rank 0 builds them with
weights (the other ranks from a copy of the config alone, where a weight read fails) and sends
each rank its shards; the KL, the export and the push (the weights gathered to rank 0) and the
checkpoint become commands of the group; rank 0 first offers it a replica's resume state, which
it refuses (`refused.json`: the message).
`--lora` trains LoRA adapters (the reference: the adapters disabled). `--save-at K` writes the
resume state after update K (`state.pt`; sharded, beside its DCP checkpoint under
`OUT/checkpoints`); `--resume STATE` restores one (on any number of ranks: every rank reads the
file) and runs the updates after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.devtools.tiny_models import cached_tiny_model
from services.trainer.distributed import end_rank
from services.trainer.grpo import Placement, loss_config
from services.trainer.rl import KlEstimator, LossType
from services.trainer.rl.actor import Objective, build_actor
from services.trainer.rl.batch import Sample, TokenBatch, make_batch
from services.trainer.rl.group import Follower, follow, open_group
from services.trainer.rl.weight_sync import PushPublisher, WeightPusher
from services.trainer.spec import LoraParams
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


def base_model(out: Path, built_on: str) -> Path:
    """The tiny model; for a rank that builds it on "meta", a copy of its config alone: a
    weight read there fails."""
    path = cached_tiny_model("test")
    if built_on != "meta":
        return path
    config = out / f"config-only-{os.environ['RANK']}"
    config.mkdir(parents=True, exist_ok=True)
    shutil.copy(path / "config.json", config)
    return config


def main(args: argparse.Namespace) -> None:
    out: Path = args.out
    group = open_group("cpu")  # None: one process
    spec = job(lr=1e-3, beta=0.1)
    if args.lora:
        spec = dataclasses.replace(spec, lora=LoraParams(r=4, alpha=8))
    where = Placement.of({"strategy": "fsdp" if args.fsdp else "ddp"}, group)  # as GRPO's
    actor = build_actor(base_model(out, where.built_on), spec, "fp32", where.built_on)
    torch.manual_seed(0)  # the same on every rank
    with torch.no_grad():  # off the reference, so KL and its gradient are not 0
        for p in actor.model.parameters():  # (no-ops on "meta": those ranks get rank 0's)
            p.add_(torch.randn_like(p) * 0.02)
    actor.group = group
    actor.checkpoints = out / "checkpoints"
    if where.sharded:
        actor.shard(where.device)
    actor.configure_optimizer(spec, "fp32", 100)
    if args.resume:  # every rank reads the checkpoint: the same folder
        actor.checkpoints = args.resume.parent / "checkpoints"
    if group is not None and group.rank != 0:
        follow(Follower(actor), group)
        return
    out.mkdir(parents=True, exist_ok=True)
    if actor.sharded:  # a replica's state (its weights whole) is refused, before any collective
        try:
            actor.load_state_dict({"trainable": {}}, (out / "state.pt", "actor"))
        except ValueError as refused:
            (out / "refused.json").write_text(json.dumps(str(refused)))
    start = 0
    if args.resume:
        state = torch.load(args.resume, weights_only=False)
        actor.load_state_dict(state["actor"], (args.resume, "actor"))
        start = state["updates"]
    batch, advantages = fixed_batch()
    metrics = []
    for done, (loss_type, micro, iterations) in enumerate(CASES[start:], start + 1):
        kl = actor.reference_kl(batch, KlEstimator.K1, 2)  # (N, T)
        loss = dataclasses.replace(loss_config(spec.params), loss_type=LossType(loss_type))
        objective = Objective(loss, num_iterations=iterations, micro_batch_size=micro)
        values = actor.update(batch, advantages, objective)
        metrics.append(values | {"reference_kl": float((kl * batch.mask).sum())})
        if done == args.save_at:
            torch.save({"actor": actor.state_dict(), "updates": done}, out / "state.pt")
    actor.export(out / "export")
    weights = actor.gathered() if actor.sharded else actor.model.state_dict()
    publisher = PushPublisher.for_job(
        WeightPusher("localhost:1", ()),  # not called: the payload is built, not pushed
        upload,
        actor.model,
        spec,
        "j",
        len(CASES),
        actor.gathered if actor.sharded else None,
    )
    pushed = publisher.weights(publisher.policy, len(CASES), False).tensors
    sharded = any(type(p).__name__ == "DTensor" for p in actor.model.parameters())
    if group is not None:
        group.stop()
    save_file({k: v.detach().clone() for k, v in weights.items()}, out / "weights.safetensors")
    save_file({k: v.clone() for k, v in pushed.items()}, out / "pushed.safetensors")
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "sharded.json").write_text(json.dumps(sharded))


async def upload(folder: Path, name: str) -> str:
    raise AssertionError("a push, not a registry revision")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--resume", type=Path)
    main(parser.parse_args())
    end_rank(0)  # without the finalization that can abort a rank (distributed.py)
