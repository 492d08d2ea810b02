"""Generated tokens/s through the rollout service vs plain in-process `model.generate`.

1, 8, 32 and 128 prompts, each with n=1 and n=4, x 48 new tokens on the ~3.5M-parameter tiny
model ("bench"), the same sampling (temperature 1, no top-k/top-p) on both sides. For each shape
the two sides run interleaved (which goes first alternates), `--repeats` rounds; prints the median
and spread (min-max) of each side's tokens/s, and of the ratio of the two in each round (a
round's two runs are seconds apart, so load that drifts over minutes cancels; target >= 0.9).

    .venv/bin/python bench/rollout_throughput.py [--repeats 5] [--shapes 1x1,8x4]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.logs import configure_logging
from services.devtools.server_thread import ServerThread
from services.devtools.tiny_models import cached_tiny_model
from services.rollout import app
from services.rollout.settings import RolloutSettings
from services.rollout.weights import LocalWeights, ResolvedRevision, WeightFormat
from tlm.common.v1 import common_pb2
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

NEW_TOKENS = 48
SHAPES = ((1, 1), (8, 1), (32, 1), (128, 1), (1, 4), (8, 4), (32, 4), (128, 4))
NAMES = ["Anna", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goro", "Hana"]
NOUNS = ["apple", "book", "cat", "coin"]
MODEL = "models/bench/revisions/r1"


def prompts(count: int) -> list[str]:
    return [
        f"{NAMES[i % 8]} has {i * 7} {NOUNS[i % 4]}s. What is {i} + {i * 3}?" for i in range(count)
    ]


def counted(rows: torch.Tensor, eos: set[int]) -> int:
    """Generated tokens per row up to and including the first end-of-sequence token."""
    total = 0
    for row in rows.tolist():
        hits = [i for i, t in enumerate(row) if t in eos]
        total += hits[0] + 1 if hits else len(row)
    return total


class Peer:
    """`model.generate` in this process, the model loaded once."""

    def __init__(self, folder: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.eos = set(self.model.generation_config.eos_token_id)

    def rate(self, count: int, n: int) -> float:
        start = time.perf_counter()  # tokenizing is part of the work, as in the service
        batch = self.tokenizer(prompts(count), return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=n,
                max_new_tokens=NEW_TOKENS,
            )
        elapsed = time.perf_counter() - start
        return counted(out[:, batch["input_ids"].shape[1] :], self.eos) / elapsed


def service_rate(stub: rollout_pb2_grpc.RolloutServiceStub, count: int, n: int) -> float:
    request = rollout_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text=p) for p in prompts(count)],
        sampling=rollout_pb2.SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=NEW_TOKENS),
    )
    start = time.perf_counter()
    tokens = sum(len(c.token_ids) for r in stub.Generate(request) for c in r.completions)
    return tokens / (time.perf_counter() - start)


def interleaved(
    sides: tuple[Callable[[], float], Callable[[], float]], repeats: int
) -> tuple[list[float], list[float]]:
    """Both sides once to warm up, then `repeats` rounds, alternating which goes first."""
    for side in sides:
        side()
    first, second = [], []
    for i in range(repeats):
        if i % 2 == 0:
            first.append(sides[0]())
            second.append(sides[1]())
        else:
            second.append(sides[1]())
            first.append(sides[0]())
    return first, second


def spread(runs: list[float]) -> str:
    return f"{statistics.median(runs):7,.0f} [{min(runs):,.0f}-{max(runs):,.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="", help="PROMPTSxN,... (default: all)")
    args = parser.parse_args()
    shapes = (
        [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else list(SHAPES)
    )
    configure_logging(json=True, level="warning")
    folder = cached_tiny_model("bench")
    weights = LocalWeights()
    weights.add(ResolvedRevision(MODEL, WeightFormat.FULL, folder))
    settings = RolloutSettings(host="127.0.0.1", port=0, insecure_dev=True)
    peer = Peer(str(folder))
    threads = torch.get_num_threads()
    print(f"{NEW_TOKENS} new tokens, tiny 'bench' model, CPU, torch threads: {threads}")
    print(f"tokens/s, median [min-max] of {args.repeats} interleaved rounds (target ratio >= 0.9)")
    print("prompts  n   rollout service         model.generate          ratio (per round)")
    with ServerThread(lambda: [app.binding(settings, weights)], settings) as server:
        stub = rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(server.address))
        stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=MODEL))
        for count, n in shapes:
            sides = (
                functools.partial(service_rate, stub, count, n),
                functools.partial(peer.rate, count, n),
            )
            service, local = interleaved(sides, args.repeats)
            ratios = [a / b for a, b in zip(service, local, strict=True)]
            ratio = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            print(f"{count:7d} {n:2d}   {spread(service):22s}  {spread(local):22s}  {ratio}")


if __name__ == "__main__":
    main()
