"""One process vs a 2-process torchrun group on the same global batch: steps/s and memory per
rank, for DDP (a full replica per rank) and FSDP2 (`fully_shard` per decoder layer, then the
model: weights, gradients and AdamW moments sharded).

Each run trains the ~3.5M-parameter "bench" tiny model (fp32, AdamW) on the same seeded global
batch of 8 sequences x 128 tokens, each rank on its share, through torchrun (gloo on CPU, NCCL on
GPU), `--rounds` times, interleaved. It prints the median and spread of steps/s and of the
per-round ratio to one process (on a 2-core CPU it shows the overhead of
the collectives; on a GPU host it shows scaling), and per rank the model-state bytes it holds
(its local shards of parameters, gradients and optimizer moments: what FSDP divides) and its
peak memory (CUDA's max allocated, or the process's peak RSS on CPU, which the libraries
dominate for a tiny model).

A second table does the same for the online RL actor (`rl/actor.py`, GRPO's, full tuning with
a reference model: `rl/group.py`): one process, the replicated group and the FSDP group, each
taking the same updates on a fixed batch of 8 sequences x 64 tokens (2 per forward pass); its
model state adds the reference model's weights (sharded too under FSDP).

    .venv/bin/python bench/multi_device.py [--steps 20] [--rounds 3] [--size bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GLOBAL_BATCH, LENGTH, WARMUP = 8, 128, 2
RUNS = (("single", 1), ("ddp", 2), ("fsdp", 2))
ACTOR_RUNS = (("actor-single", 1), ("actor-ddp", 2), ("actor-fsdp", 2))
ACTOR_ROWS, ACTOR_LENGTH, ACTOR_MICRO = 8, 64, 2


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


def actor_worker(strategy: str, steps: int, size: str, out: Path) -> None:
    """The online actor (GRPO's, KL to a reference) replicated or sharded over the group; rank
    0 leads the updates, the others follow (`rl/group.py`)."""
    import torch

    from services.devtools.tiny_models import cached_tiny_model
    from services.trainer.domain import Method
    from services.trainer.grpo import Placement, objective
    from services.trainer.rl.actor import build_actor
    from services.trainer.rl.batch import Sample, make_batch
    from services.trainer.rl.group import Follower, follow, open_group
    from services.trainer.spec import GrpoParams, JobSpec, Sampling, TrainingParams

    cuda = torch.cuda.is_available()
    group = open_group("cuda" if cuda else "cpu")  # None: one process
    params = GrpoParams(num_generations=2, sampling=Sampling(n=2, max_tokens=ACTOR_LENGTH))
    training = TrainingParams(learning_rate=1e-4, lr_scheduler="constant")
    base, data = "models/b/revisions/1", "datasets/p/revisions/1"
    spec = JobSpec(Method.GRPO, base, data, None, training=training, params=params)
    plan = {"device_type": "cuda" if cuda else "cpu", "strategy": strategy.removeprefix("actor-")}
    where = Placement.of(plan, group)  # as a GRPO job's: sharded, only rank 0 reads weights
    actor = build_actor(cached_tiny_model(size), spec, "fp32", where.built_on)
    actor.group = group
    if where.sharded:
        actor.shard(where.device)
    actor.configure_optimizer(spec, "fp32", WARMUP + steps)
    rank = group.rank if group is not None else 0
    elapsed = 0.0
    if rank == 0:
        g = torch.Generator().manual_seed(0)
        vocab = 2048 if size == "bench" else 512
        shape = (ACTOR_LENGTH,)
        rows = [torch.randint(1, vocab, shape, generator=g).tolist() for _ in range(ACTOR_ROWS)]
        samples = [Sample(r[:8], r[8:], [-1.0] * (ACTOR_LENGTH - 8), "", "base") for r in rows]
        batch = make_batch(samples, torch.ones(ACTOR_ROWS, dtype=torch.bool), 0, actor.device)
        advantages = torch.randn(batch.mask.shape, generator=g).to(actor.device) * batch.mask
        how = objective(params, ACTOR_MICRO)
        for step in range(WARMUP + steps):
            if step == WARMUP:
                start = time.perf_counter()
            actor.update(batch, advantages, how)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    elif group is not None:
        follow(Follower(actor), group)  # until rank 0's stop
    held = state_bytes(actor.model, actor.optimizer)  # local shards: no collective
    if actor.reference is not None:
        held += state_bytes(actor.reference, torch.optim.SGD([torch.zeros(1)]))
    if group is not None and rank == 0:
        group.stop()
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result = {"steps_per_s": steps / elapsed if elapsed else 0.0, "state": held, "peak": peak}
    (out / f"{strategy}-{rank}.json").write_text(json.dumps(result))


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--worker", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        run = actor_worker if args.worker.startswith("actor-") else worker
        run(args.worker, args.steps, args.size, Path(args.out))
        return
    from services.devtools.tiny_models import cached_tiny_model

    cached_tiny_model(args.size)  # built once, before the ranks race for it
    with tempfile.TemporaryDirectory() as tmp:
        results = rounds(RUNS, args.rounds, args.steps, args.size, Path(tmp))
        actors = rounds(ACTOR_RUNS, args.rounds, args.steps, args.size, Path(tmp))
    print(f"global batch {GLOBAL_BATCH} x {LENGTH} tokens, {args.steps} steps, model {args.size}")
    print(f"steps/s and ratio to one process: median [min-max] of {args.rounds} rounds")
    table(RUNS, results)
    print(f"online actor: {ACTOR_ROWS} x {ACTOR_LENGTH} tokens per update, KL to a reference")
    table(ACTOR_RUNS, actors)


Ranks = list[dict[str, float]]


def rounds(
    runs: tuple[tuple[str, int], ...], count: int, steps: int, size: str, out: Path
) -> dict[str, list[Ranks]]:
    """Every run `count` times, interleaved (each round starts one run later), so that drift
    in the machine's load hits them alike."""
    results: dict[str, list[Ranks]] = {strategy: [] for strategy, _ in runs}
    for k in range(count):
        for strategy, nproc in runs[k % len(runs) :] + runs[: k % len(runs)]:
            results[strategy].append(launch(strategy, nproc, steps, size, out))
    return results


def rate(ranks: Ranks) -> float:
    """The group goes at its slowest rank (the actor's followers keep no clock: rank 0's)."""
    return min(r["steps_per_s"] for r in ranks if r["steps_per_s"])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def table(runs: tuple[tuple[str, int], ...], results: dict[str, list[Ranks]]) -> None:
    base = [rate(r) for r in results[runs[0][0]]]
    mib = 2**20
    print(f"{'run':<16}{'steps/s':>20}{'ratio':>20}  per rank: model state MiB, peak MiB")
    for strategy, nproc in runs:
        rates = [rate(r) for r in results[strategy]]
        ratios = [a / b for a, b in zip(rates, base, strict=True)]
        per_rank = "  ".join(
            f"r{i} {r['state'] / mib:.1f}, {r['peak'] / mib:.0f}"
            for i, r in enumerate(results[strategy][-1])
        )
        print(f"{f'{strategy} x{nproc}':<16}{spread(rates):>20}{spread(ratios):>20}  {per_rank}")


if __name__ == "__main__":
    main()
