"""Reward Score throughput over gRPC vs the same scorer code in process, at batch sizes 1, 16
and 256, and latency under 16 concurrent clients.

For each batch size the sides run interleaved (which goes first rotates), `--repeats` rounds of
`--samples` samples each: in process (one thread), over gRPC with rules in the server's thread
(`rule_workers=0`, like for like) and over gRPC with `--workers` rule worker processes. Prints
the median and spread (min-max) of samples/s per side, and of its ratio to in-process within
each round (target >= 0.8 from batch 16).

    .venv/bin/python bench/reward_throughput.py [--samples 512] [--workers 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf import json_format

from services.common.logs import configure_logging
from services.devtools.server_thread import ServerThread
from services.reward import app, convert
from services.reward.aggregate import combine, scorer_result
from services.reward.rule_runner import run_chunk
from services.reward.settings import RewardSettings
from services.specs.evaluator import require_valid
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

MATH_SPEC = {
    "scorers": [
        {"name": "format", "weight": 0.2, "format": {"tags": ["think", "answer"]}},
        {"name": "correct", "weight": 1.0, "math": {"extraction": {"tag": "answer"}}},
        {"name": "short", "weight": 0.5, "length": {"max_length": 100}},
    ],
    "gates": [{"scorer": "format", "reward": -1.0}],
}


def spec(data: Mapping[str, object]) -> ev.EvaluatorSpec:
    return json_format.ParseDict(dict(data), ev.EvaluatorSpec())


def sample(sample_id: str, completion: str, reference: str) -> rs.Sample:
    msg = rs.Sample(sample_id=sample_id, completion=completion)
    msg.metadata.update({"reference": reference})
    return msg


def make_samples(n: int, offset: int) -> list[rs.Sample]:
    # Distinct completions, so the cache never answers.
    return [
        sample(
            f"s{i}",
            f"<think>{i + offset} steps</think>\n<answer>${(i + offset) % 97}$</answer>",
            reference=str((i + offset) % 89),
        )
        for i in range(n)
    ]


def in_process(samples: list[rs.Sample], batch: int) -> float:
    """Conversion from proto, every scorer, and combining: what Score does, without gRPC."""
    evaluator = require_valid(spec(MATH_SPEC))
    payloads = [s.SerializeToString() for s in evaluator.scorers]
    start = time.perf_counter()
    for i in range(0, len(samples), batch):
        chunk = [convert.sample_from_proto(s) for s in samples[i : i + batch]]
        columns = [[r for r, _ in run_chunk(p, chunk)] for p in payloads]
        for j, one in enumerate(chunk):
            row = [
                scorer_result(sc, col[j])
                for sc, col in zip(evaluator.scorers, columns, strict=True)
            ]
            combine(evaluator, one.sample_id, row)
    return len(samples) / (time.perf_counter() - start)


def over_grpc(stub: rs_grpc.RewardServiceStub, samples: list[rs.Sample], batch: int) -> float:
    evaluator = spec(MATH_SPEC)
    start = time.perf_counter()
    statuses: set[int] = set()
    for i in range(0, len(samples), batch):
        request = rs.ScoreRequest(spec=evaluator, samples=samples[i : i + batch])
        response = stub.Score(request, timeout=120)
        statuses |= {r.status for r in response.results}
    rate = len(samples) / (time.perf_counter() - start)
    if statuses != {rs.SCORE_STATUS_OK}:  # a fast stream of errors is not throughput
        raise SystemExit(f"unexpected statuses {statuses}")
    return rate


def serve(workers: int) -> ServerThread:
    settings = RewardSettings(
        host="127.0.0.1", port=0, insecure_dev=True, rule_workers=workers,
        cache_entries=0, data_dir=Path(tempfile.mkdtemp()),
    )  # fmt: skip
    return ServerThread(lambda: [app.binding(settings)], settings).start()


def latency(stub: rs_grpc.RewardServiceStub, clients: int, calls: int) -> list[float]:
    evaluator = spec(MATH_SPEC)

    def client(c: int) -> list[float]:
        times = []
        for k in range(calls):
            batch = make_samples(16, 10_000_000 + (c * calls + k) * 16)
            start = time.perf_counter()
            stub.Score(rs.ScoreRequest(spec=evaluator, samples=batch), timeout=120)
            times.append(time.perf_counter() - start)
        return times

    with ThreadPoolExecutor(clients) as pool:
        return [t for ts in pool.map(client, range(clients)) for t in ts]


def spread(runs: list[float]) -> str:
    return f"{statistics.median(runs):7,.0f} [{min(runs):,.0f}-{max(runs):,.0f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=512, help="samples per round and side")
    parser.add_argument("--workers", type=int, default=2, help="rule worker processes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,16,256")
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    in_process(make_samples(64, 5_000_000), 64)  # warm sympy / math-verify
    # Like for like: one server scores in one thread (rule_workers=0), the other as deployed.
    thread_server, pool_server = serve(0), serve(args.workers)
    offset = iter(range(10_000_000, 1 << 40, args.samples))  # distinct: the cache never answers
    try:
        with (
            grpc.insecure_channel(thread_server.address) as thread_channel,
            grpc.insecure_channel(pool_server.address) as pool_channel,
        ):
            thread = rs_grpc.RewardServiceStub(thread_channel)
            pool = rs_grpc.RewardServiceStub(pool_channel)
            sides = {
                "in process": lambda s, b: in_process(s, b),
                "gRPC, rules in 1 thread": lambda s, b: over_grpc(thread, s, b),
                f"gRPC, {args.workers} rule workers": lambda s, b: over_grpc(pool, s, b),
            }
            print(f"samples/s, median [min-max] of {args.repeats} interleaved rounds")
            for batch in (int(b) for b in args.batches.split(",")):
                runs: dict[str, list[float]] = {name: [] for name in sides}
                for side in sides.values():  # warm-up
                    side(make_samples(batch, next(offset)), batch)
                names = list(sides)
                for r in range(args.repeats):
                    for name in names[r % 3 :] + names[: r % 3]:
                        runs[name].append(
                            sides[name](make_samples(args.samples, next(offset)), batch)
                        )
                for name, rates in runs.items():
                    ratios = [a / b for a, b in zip(rates, runs["in process"], strict=True)]
                    print(
                        f"batch {batch:4d}  {name:24s} {spread(rates):24s} ratio "
                        f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
                    )
            times = sorted(latency(pool, clients=16, calls=8))
    finally:
        thread_server.stop()
        pool_server.stop()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    print("target: gRPC / in process >= 0.8 from batch 16")
    print(f"16 clients x 16-sample calls: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
