"""Reward Score throughput over gRPC vs the same scorer code in process, and latency under
16 concurrent clients. Prints the ratio (target >= 0.8).

    .venv/bin/python bench/reward_throughput.py [--samples 2048] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
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

BATCH = 256
MATH_SPEC = {
    "scorers": [
        {"name": "format", "weight": 0.2, "format": {"tags": ["think", "answer"]}},
        {"name": "correct", "weight": 1.0, "math": {"extraction": {"tag": "answer"}}},
        {"name": "short", "weight": 0.5, "length": {"max_length": 100}},
    ],
    "gates": [{"scorer": "format", "reward": -1.0}],
}


def spec(data: dict[str, object]) -> ev.EvaluatorSpec:
    return json_format.ParseDict(data, ev.EvaluatorSpec())


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


def in_process(samples: list[rs.Sample]) -> float:
    evaluator = require_valid(spec(MATH_SPEC))
    domain = [convert.sample_from_proto(s) for s in samples]
    start = time.perf_counter()
    for i in range(0, len(domain), BATCH):
        batch = domain[i : i + BATCH]
        columns = [
            [r for r, _ in run_chunk(s.SerializeToString(), batch)] for s in evaluator.scorers
        ]
        for j, one in enumerate(batch):
            row = [
                scorer_result(sc, col[j])
                for sc, col in zip(evaluator.scorers, columns, strict=True)
            ]
            combine(evaluator, one.sample_id, row)
    return len(domain) / (time.perf_counter() - start)


def over_grpc(stub: rs_grpc.RewardServiceStub, samples: list[rs.Sample]) -> float:
    evaluator = spec(MATH_SPEC)
    start = time.perf_counter()
    statuses: set[int] = set()
    for i in range(0, len(samples), BATCH):
        request = rs.ScoreRequest(spec=evaluator, samples=samples[i : i + BATCH])
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2, help="rule worker processes")
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    in_process(make_samples(64, 5_000_000))  # warm sympy / math-verify
    local = in_process(make_samples(args.samples, 0))
    # Like for like: the server scores in one thread too (rule_workers=0).
    server = serve(0)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            over_grpc(stub, make_samples(BATCH, 7_000_000))
            same = over_grpc(stub, make_samples(args.samples, 2_000_000))
    finally:
        server.stop()
    server = serve(args.workers)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            over_grpc(stub, make_samples(BATCH, 6_000_000))  # warm the workers
            remote = over_grpc(stub, make_samples(args.samples, 1_000_000))
            times = sorted(latency(stub, clients=16, calls=8))
    finally:
        server.stop()
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    print(f"in-process (1 thread): {local:8.0f} samples/s")
    print(f"gRPC Score (batch {BATCH}, rules in 1 thread): {same:8.0f} samples/s")
    print(f"ratio gRPC / in-process, like for like: {same / local:.2f}  (target >= 0.8)")
    print(f"gRPC Score (batch {BATCH}, {args.workers} rule workers): {remote:8.0f} samples/s")
    print(f"16 clients x 16-sample calls: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
