"""Generated tokens/s through the rollout service vs plain in-process `model.generate`.

32 prompts x n=4 x 48 new tokens on the ~3.5M-parameter tiny model ("bench"), the same sampling
(temperature 1, no top-k/top-p) on both sides. Prints both rates and their ratio (target >= 0.9).

    .venv/bin/python bench/rollout_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

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

PROMPTS, N, NEW_TOKENS = 32, 4, 48
NAMES = ["Anna", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goro", "Hana"]
NOUNS = ["apple", "book", "cat", "coin"]
MODEL = "models/bench/revisions/r1"


def prompts() -> list[str]:
    return [
        f"{NAMES[i % 8]} has {i * 7} {NOUNS[i % 4]}s. What is {i} + {i * 3}?"
        for i in range(PROMPTS)
    ]


def counted(rows: torch.Tensor, eos: set[int]) -> int:
    """Generated tokens per row up to and including the first end-of-sequence token."""
    total = 0
    for row in rows.tolist():
        hits = [i for i, t in enumerate(row) if t in eos]
        total += hits[0] + 1 if hits else len(row)
    return total


def peer_rate(folder: str) -> float:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(prompts(), return_tensors="pt", padding=True)
    eos = set(model.generation_config.eos_token_id)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=N,
            max_new_tokens=NEW_TOKENS,
        )
    elapsed = time.perf_counter() - start
    return counted(out[:, batch["input_ids"].shape[1] :], eos) / elapsed


def service_rate(stub: rollout_pb2_grpc.RolloutServiceStub, seed: int) -> float:
    request = rollout_pb2.GenerateRequest(
        prompts=[common_pb2.Prompt(text=p) for p in prompts()],
        sampling=rollout_pb2.SamplingParams(
            n=N, temperature=1.0, top_p=1.0, max_tokens=NEW_TOKENS, seed=seed
        ),
    )
    start = time.perf_counter()
    tokens = sum(len(c.token_ids) for r in stub.Generate(request) for c in r.completions)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    folder = cached_tiny_model("bench")
    weights = LocalWeights()
    weights.add(ResolvedRevision(MODEL, WeightFormat.FULL, folder))
    settings = RolloutSettings(host="127.0.0.1", port=0, insecure_dev=True)
    with ServerThread(lambda: [app.binding(settings, weights)], settings) as server:
        stub = rollout_pb2_grpc.RolloutServiceStub(grpc.insecure_channel(server.address))
        stub.LoadModel(rollout_pb2.LoadModelRequest(model_revision=MODEL))
        service_rate(stub, 0)  # warm-up
        peer_rate(str(folder))
        service, peer = [], []
        for i in range(args.repeats):  # interleaved, so load on the machine hits both alike
            service.append(service_rate(stub, i + 1))
            peer.append(peer_rate(str(folder)))
    s, p = statistics.median(service), statistics.median(peer)
    print(f"workload: {PROMPTS} prompts x n={N} x {NEW_TOKENS} new tokens, tiny 'bench' model, CPU")
    print(f"torch threads: {torch.get_num_threads()}")
    service_runs, peer_runs = [round(x) for x in service], [round(x) for x in peer]
    print(f"rollout service (transformers engine): {s:,.0f} tokens/s  runs={service_runs}")
    print(f"in-process model.generate:             {p:,.0f} tokens/s  runs={peer_runs}")
    print(f"ratio service / generate: {s / p:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
