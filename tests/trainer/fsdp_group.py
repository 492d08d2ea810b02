"""One rank of an FSDP2 run for tests/trainer/test_distributed_fsdp.py, under torchrun (or
alone: one process, no group): the tiny model, AdamW, `steps` steps on this rank's share of a
fixed global batch, optionally resumed from or saved to a sharded (DCP) checkpoint; rank 0
writes the full weights and the losses.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.trainer.fsdp_group \
        OUT --steps 3 [--save-at 2] [--resume CKPT]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from services.devtools.tiny_models import cached_tiny_model
from services.trainer.distributed import (
    end_rank,
    full_state_dict,
    load_sharded,
    rank,
    save_sharded,
    shard_model,
    world_size,
)

GLOBAL_BATCH, LENGTH, VOCAB = 4, 16, 512


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--start", type=int, default=0)
    args = parser.parse_args()
    grouped = world_size() > 1
    if grouped:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(cached_tiny_model("test"), dtype=torch.float32)
    if grouped:
        shard_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if args.resume:
        load_sharded(args.resume, model, optimizer)
    data = torch.randint(
        0, VOCAB, (args.steps, GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1)
    )
    losses = []
    for step in range(args.start, args.steps):
        share = data[step].chunk(world_size())[rank()]  # (GLOBAL_BATCH / world, LENGTH)
        loss = model(input_ids=share, labels=share).loss  # equal token counts: mean of means
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if grouped:
            dist.all_reduce(total)
        losses.append(total.item() / world_size())
        if step + 1 == args.save_at:
            save_sharded(args.out / "checkpoint", model, optimizer)
    state = full_state_dict(model) if grouped else model.state_dict()
    if rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().clone() for k, v in state.items()}, args.out / "weights.safetensors"
        )
        (args.out / "losses.json").write_text(json.dumps(losses))
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        (args.out / "sharded.json").write_text(json.dumps(sharded))
    if grouped:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
    end_rank(0)  # without the finalization that can abort a rank (distributed.py)
