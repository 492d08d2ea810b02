"""Reward Score throughput over gRPC vs the same scorer code in process, at batch sizes 1, 16, 32,
64 and 256, and latency under 16 concurrent clients.

For each batch size, `--repeats` rounds of `--samples` samples per side: in process (the same
scorer code in the calling thread, no worker processes), over gRPC with rules in the server's
thread (`rule_workers=0`, like for like) and over gRPC with `--workers` rule worker processes.
Each service runs in its own process, as deployed (`tlm serve reward`): the client and the
server share no GIL. Within a round the sides take turns of `--turn` samples, in every order in
turn, so load from elsewhere on the host falls on all of them alike. Prints the median and
spread (min-max) of samples/s per side, and of its ratio to in-process within each round
(target >= 0.8 from batch 16); then, per sample, the CPU time spent (this process, the servers'
and their rule workers') and the time those threads waited for a CPU: a side that waited much
longer than the others was measured under more load (Linux /proc schedstat).

    .venv/bin/python bench/reward_throughput.py [--samples 512] [--workers 2] [--repeats 5]
        [--batches 1,16,32,64,256] [--turn 128]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import hashlib
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grpc
from google.protobuf import json_format

from services.common.logs import configure_logging
from services.devtools.server_process import start_service, stop_service, tree
from services.reward import convert
from services.reward.aggregate import combine, scorer_result
from services.reward.rule_worker import run_chunk
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


# Each sample takes a number never used before (so the outcome cache, off in the servers here,
# could never answer), and its answer and reference come from a hash of that number: every
# batch size scores the same mix of samples. (With numbers stepped by 2**20 per call, a math
# sample took 0.35 ms at batch 16 and 0.65 ms at 32 and 64, reproducibly, so batch 16 was
# measured on half the work per sample; the cause, some interplay with sympy's or math-verify's
# caches, is not pinned down.)
UNUSED = [100_000_000]  # the first number no sample has used


def fresh(n: int) -> int:
    """The first of `n` numbers no sample has used."""
    first = UNUSED[0]
    UNUSED[0] += n
    return first


def make_samples(n: int, first: int) -> list[rs.Sample]:
    """Samples `first` .. `first + n - 1`: distinct completions, an answer in 0..96 and a
    reference in 0..88 drawn from a hash of the number."""
    out = []
    for k in range(first, first + n):
        mixed = hashlib.blake2b(k.to_bytes(8, "little"), digest_size=8).digest()
        value = int.from_bytes(mixed, "little")
        answer, reference = value % 97, (value >> 16) % 89
        completion = f"<think>{k} steps</think>\n<answer>${answer}$</answer>"
        out.append(sample(f"s{k - first}", completion, reference=str(reference)))
    return out


class InProcess:
    """The peer: conversion from proto, every scorer, and combining, in the calling thread; what
    Score does for a batch, without gRPC, admission, worker processes or the outcome cache."""

    def __init__(self) -> None:
        self.evaluator = require_valid(spec(MATH_SPEC))
        self.payloads = [s.SerializeToString() for s in self.evaluator.scorers]

    def __call__(self, batch: list[rs.Sample]) -> None:
        samples = [convert.sample_from_proto(s) for s in batch]
        columns = [[r for r, _ in run_chunk(p, samples)] for p in self.payloads]
        for j, one in enumerate(samples):
            row = [
                scorer_result(sc, col[j])
                for sc, col in zip(self.evaluator.scorers, columns, strict=True)
            ]
            combine(self.evaluator, one.sample_id, row)


class OverGrpc:
    """One Score call per batch."""

    def __init__(self, stub: rs_grpc.RewardServiceStub) -> None:
        self.stub = stub
        self.evaluator = spec(MATH_SPEC)

    def __call__(self, batch: list[rs.Sample]) -> None:
        request = rs.ScoreRequest(spec=self.evaluator, samples=batch)
        statuses = {r.status for r in self.stub.Score(request, timeout=120).results}
        if statuses != {rs.SCORE_STATUS_OK}:  # a fast stream of errors is not throughput
            raise SystemExit(f"unexpected statuses {statuses}")


Side = Callable[[list[rs.Sample]], None]
Order = tuple[str, ...]  # the sides in the order they take their turns


class Round(NamedTuple):
    """Per side: samples/s, and per sample the CPU ms spent by this process, the services and
    their rule workers (load-independent, mostly) and the ms their threads waited for a CPU (the
    host's load)."""

    rate: dict[str, float]
    cpu_ms: dict[str, float]
    waited_ms: dict[str, float]


def schedstat() -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of every thread of this process, of the
    services and of their children (the rule workers), from /proc/<pid>/task/<tid>/schedstat."""
    on_cpu = waited = 0
    for pid in tree(os.getpid()):
        for stat in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            with contextlib.suppress(OSError), open(stat) as f:
                ran, wait, _ = f.read().split()
                on_cpu, waited = on_cpu + int(ran), waited + int(wait)
    return on_cpu, waited


def one_round(
    sides: Mapping[str, Side], samples: int, batch: int, turn: int, orders: Iterator[Order]
) -> Round:
    """Each side over `samples` distinct samples. The sides take turns of `turn` samples, long
    enough for a side's CPU caches to be warm as in a busy service (turns of one 16-sample call
    put the rule workers, whose memory the other sides had evicted, at 0.73), and
    in every order in turn (each side follows each other as often); load from elsewhere on the
    host falls on all of them alike. `orders` goes on from one round to the next."""
    calls = max(samples // batch, 1)
    batches = {name: [make_samples(batch, fresh(batch)) for _ in range(calls)] for name in sides}
    per_turn = max(turn // batch, 1)
    spent = {name: [0.0, 0, 0] for name in sides}  # seconds, CPU ns, waited ns
    for turn in range(0, calls, per_turn):
        for name in next(orders):
            cpu, waited = schedstat()
            start = time.perf_counter()
            for k in range(turn, min(turn + per_turn, calls)):
                sides[name](batches[name][k])
            seconds = time.perf_counter() - start
            cpu_after, waited_after = schedstat()
            total = spent[name]
            total[0] += seconds
            total[1] += cpu_after - cpu
            total[2] += waited_after - waited
    n = calls * batch
    return Round(
        rate={name: n / t[0] for name, t in spent.items()},
        cpu_ms={name: t[1] / 1e6 / n for name, t in spent.items()},
        waited_ms={name: t[2] / 1e6 / n for name, t in spent.items()},
    )


def serve(workers: int, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A reward service with `workers` rule workers and no outcome cache, in its own process."""
    env = {
        "TLM_REWARD_RULE_WORKERS": str(workers),
        "TLM_REWARD_CACHE_ENTRIES": "0",
        "TLM_REWARD_DATA_DIR": str(root / f"reward-{workers}"),
    }
    proc, address = start_service("reward", root / f"reward-{workers}", env)
    return proc, address


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
    parser.add_argument("--batches", default="1,16,32,64,256")
    parser.add_argument("--turn", type=int, default=128, help="samples per side before the next")
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    InProcess()(make_samples(64, 5_000_000))  # warm sympy / math-verify
    # Like for like: one server scores in one thread (rule_workers=0), the other as deployed.
    root = Path(tempfile.mkdtemp(prefix="tlm-bench-reward-"))
    (thread_server, thread_address), (pool_server, pool_address) = (
        serve(0, root),
        serve(args.workers, root),
    )
    try:
        with (
            grpc.insecure_channel(thread_address) as thread_channel,
            grpc.insecure_channel(pool_address) as pool_channel,
        ):
            pool = rs_grpc.RewardServiceStub(pool_channel)
            sides: dict[str, Side] = {
                "in process": InProcess(),
                "gRPC, rules in 1 thread": OverGrpc(rs_grpc.RewardServiceStub(thread_channel)),
                f"gRPC, {args.workers} rule workers": OverGrpc(pool),
            }
            print(
                f"samples/s, median [min-max] of {args.repeats} interleaved rounds; per sample, "
                "CPU time of this process, the services and their rule workers, and time they "
                "waited for a CPU"
            )
            for batch in (int(b) for b in args.batches.split(",")):
                orders = itertools.cycle(itertools.permutations(sides))
                one_round(sides, batch, batch, args.turn, orders)  # warm-up
                rounds = [
                    one_round(sides, args.samples, batch, args.turn, orders)
                    for _ in range(args.repeats)
                ]
                for name in sides:
                    rates = [r.rate[name] for r in rounds]
                    ratios = [r.rate[name] / r.rate["in process"] for r in rounds]
                    cpu = statistics.median(r.cpu_ms[name] for r in rounds)
                    waited = statistics.median(r.waited_ms[name] for r in rounds)
                    print(
                        f"batch {batch:4d}  {name:24s} {spread(rates):24s} ratio "
                        f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
                        f"  cpu {cpu:.2f} ms, waited {waited:.2f} ms"
                    )
            times = sorted(latency(pool, clients=16, calls=8))
    finally:
        stop_service(thread_server)
        stop_service(pool_server)
        shutil.rmtree(root, ignore_errors=True)
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    print("target: gRPC / in process >= 0.8 from batch 16")
    print(f"16 clients x 16-sample calls: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
