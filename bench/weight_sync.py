"""Policy sync time: the direct push (PushWeights to the rollout replica) vs the registry path
it replaces (a registry revision uploaded, then LoadModel / LoadAdapter on the rollout).

For the tiny "test" model and the ~3.5M-parameter "bench" model (bench/grpo_step.py's), full
weights and a LoRA adapter (r 8 on q/v): each round syncs one changed policy both ways,
interleaved (push, registry, push, ...) so that drift in the machine's load hits both alike.
Both sides start from the model in memory, as the trainer holds it: the registry side includes
`save_pretrained` (the controller's export), the upload and the rollout's reload; the push side
reads the tensors, streams them and loads them in place. Prints the median and the spread
(min-max) of each and the ratio push / registry (below 1: the push is faster).

    .venv/bin/python bench/weight_sync.py [--rounds 7] [--models test,bench]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from services.clients.registry import RegistryClient
from services.clients.rollout import RolloutClient
from services.common.logs import configure_logging
from services.common.settings import ServerSettings
from services.devtools.server_thread import ServerThread
from services.devtools.tiny_models import cached_tiny_model
from services.trainer.rl.weight_sync import WeightPusher, actor_payload
from tlm.registry.v1 import registry_pb2

LORA = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


class Side:
    """One way to sync: `sync(model, step)` makes the rollout serve the model's weights."""

    def __init__(self, name: str, sync: Callable[[Any, int], Awaitable[None]]) -> None:
        self.name, self.sync, self.times = name, sync, []  # type: ignore[var-annotated]


def nudge(model: Any) -> None:
    """A training step's worth of change, so every sync carries new weights."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)


async def bench_model(
    address: str, size: str, lora: bool, rounds: int, folder: Path
) -> tuple[Side, Side]:
    model_dir = cached_tiny_model(size)
    tag = f"{size}-{'lora' if lora else 'full'}"
    registry = RegistryClient(address)
    await registry.create_model(f"base-{tag}")
    await registry.create_model(f"out-{tag}")
    base = (await registry.upload_model_revision(f"models/base-{tag}", model_dir)).name
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LORA)
    rollout = RolloutClient(address)
    await rollout.load_model(base)  # both sides start with the base served
    pusher = WeightPusher(address, rollout.metadata())
    fmt = registry_pb2.MODEL_FORMAT_LORA_ADAPTER if lora else registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
    lineage = registry_pb2.Lineage(base_model_revision=base)

    async def push(model: Any, step: int) -> None:
        await pusher.push(actor_payload(model, lora, f"jobs/bench-{tag}", step, base))

    async def via_registry(model: Any, step: int) -> None:
        out = folder / f"{tag}-{step}"
        model.save_pretrained(out)
        revision = await registry.upload_model_revision(
            f"models/out-{tag}", out, format=fmt, lineage=lineage
        )
        if lora:
            await rollout.load_adapter(revision.name)
        else:
            await rollout.load_model(revision.name)

    sides = (Side("push", push), Side("registry", via_registry))
    step = 0
    for _ in range(rounds + 1):  # the first round warms both up and is not counted
        for side in sides:
            step += 1
            nudge(model)
            t0 = time.perf_counter()
            await side.sync(model, step)
            if step > 2:
                side.times.append(time.perf_counter() - t0)
    await pusher.close()
    await rollout.close()
    await registry.close()
    return sides


def spread(times: list[float]) -> str:
    return (
        f"{statistics.median(times) * 1e3:7.1f} ms ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="test,bench")
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    # peft says so each time the rollout drops the previous step's adapter: expected here.
    warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
    from services.embedded import bindings_for

    with tempfile.TemporaryDirectory() as tmp:
        shared = ServerSettings(host="127.0.0.1", port=0, data_dir=Path(tmp), insecure_dev=True)
        make = lambda: bindings_for(("registry", "rollout"), shared)  # noqa: E731
        with ServerThread(make, shared) as server:
            print(f"policy sync, median (min-max) of {args.rounds} interleaved rounds, CPU")
            for size in args.models.split(","):
                for lora in (False, True):
                    push, registry = asyncio.run(
                        bench_model(server.address, size, lora, args.rounds, Path(tmp))
                    )
                    ratio = statistics.median(push.times) / statistics.median(registry.times)
                    what = f"[{size} {'lora' if lora else 'full'}]"
                    print(f"{what} push:     {spread(push.times)}")
                    print(f"{what} registry: {spread(registry.times)}")
                    print(f"{what} ratio push / registry: {ratio:.2f}")


if __name__ == "__main__":
    main()
