"""One process vs a 2-process torchrun group on the same global batch: steps/s and memory per
rank, for DDP (a full replica per rank) and FSDP2 (`fully_shard` per decoder layer, then the
model: weights, gradients and AdamW moments sharded).

Each run trains the ~3.5M-parameter "bench" tiny model (fp32, AdamW) on the same seeded global
batch of 8 sequences x 128 tokens, each rank on its share, through torchrun (gloo on CPU, NCCL on
GPU). It prints steps/s and the ratio to one process (on a 2-core CPU it shows the overhead of
the collectives; on a GPU host it shows scaling), and per rank the model-state bytes it holds
(its local shards of parameters, gradients and optimizer moments: what FSDP divides) and its
peak memory (CUDA's max allocated, or the process's peak RSS on CPU, which the libraries
dominate for a tiny model).

    .venv/bin/python bench/multi_device.py [--steps 20] [--size bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GLOBAL_BATCH, LENGTH, WARMUP = 8, 128, 2
RUNS = (("single", 1), ("ddp", 2), ("fsdp", 2))


def state_bytes(model: object, optimizer: object) -> int:
    """Bytes of this rank's parameters, gradients and optimizer moments (local shards)."""
    import torch
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    total = 0
    for p in model.parameters():  # type: ignore[attr-defined]
        total += local(p).nbytes + (local(p.grad).nbytes if p.grad is not None else 0)
    for state in optimizer.state.values():  # type: ignore[attr-defined]
        total += sum(local(v).nbytes for v in state.values() if torch.is_tensor(v) and v.dim())
    return total


def worker(strategy: str, steps: int, size: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM

    from services.devtools.tiny_models import cached_tiny_model
    from services.trainer.distributed import shard_model

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(cached_tiny_model(size)).to(device)
    if strategy == "ddp":
        model = DistributedDataParallel(model)
    elif strategy == "fsdp":
        shard_model(model)  # the trainer's FSDP2 helper: per decoder layer, then the model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = 2048 if size == "bench" else 512
    tokens = torch.randint(
        0, vocab, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(0)
    )
    share = tokens.chunk(world)[rank].to(device)  # (GLOBAL_BATCH / world, LENGTH)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(input_ids=share, labels=share).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(device)
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result = {"steps_per_s": steps / elapsed, "state": state_bytes(model, optimizer), "peak": peak}
    (out / f"{strategy}-{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def launch(strategy: str, nproc: int, steps: int, size: str, out: Path) -> list[dict[str, float]]:
    args = [
        __file__,
        "--worker",
        strategy,
        "--steps",
        str(steps),
        "--size",
        size,
        "--out",
        str(out),
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *args,
    ]
    # The same cores for every run: each rank gets its share (torchrun sets 1 for groups only).
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    return [json.loads((out / f"{strategy}-{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--worker", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.size, Path(args.out))
        return
    from services.devtools.tiny_models import cached_tiny_model

    cached_tiny_model(args.size)  # built once, before the ranks race for it
    with tempfile.TemporaryDirectory() as tmp:
        results = {s: launch(s, n, args.steps, args.size, Path(tmp)) for s, n in RUNS}
    base = results["single"][0]["steps_per_s"]
    mib = 2**20
    print(f"global batch {GLOBAL_BATCH} x {LENGTH} tokens, {args.steps} steps, model {args.size}")
    print(f"{'run':<10}{'steps/s':>9}{'ratio':>8}  per rank: model state MiB, peak MiB")
    for (strategy, nproc), ranks in zip(RUNS, results.values(), strict=True):
        rate = min(r["steps_per_s"] for r in ranks)  # the group goes at its slowest rank
        per_rank = "  ".join(
            f"r{i} {r['state'] / mib:.1f}, {r['peak'] / mib:.0f}" for i, r in enumerate(ranks)
        )
        print(f"{f'{strategy} x{nproc}':<10}{rate:>9.2f}{rate / base:>8.2f}  {per_rank}")


if __name__ == "__main__":
    main()
