"""EVALUATE: generate on prompt rows with the rollout service, score with the reward service,
report metrics. Trains nothing and produces no model revision."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from services.common.client import aio_channel, call_metadata
from services.registry.client import to_struct
from services.trainer.convert import sampling_to_proto
from services.trainer.worker_io import WorkerContext
from tlm.common.v1 import common_pb2
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

PROMPTS_PER_CALL = 64
SAMPLES_PER_CALL = 256
STATUS_NAMES: dict[int, str] = {
    rs.OK: "ok",
    rs.UNSCORABLE: "unscorable",
    rs.TIMEOUT: "timeout",
    rs.ERROR: "error",
    rs.PENDING: "pending",
}


def prompt_to_proto(prompt: Any) -> common_pb2.Prompt:
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]
    return common_pb2.Prompt(messages=common_pb2.Conversation(messages=messages))


def summarize(results: Sequence[tuple[int, float]]) -> dict[str, float]:
    """(status, reward) per sample -> metrics. Only OK samples have a reward.

    >>> m = summarize([(rs.OK, 1.0), (rs.OK, 0.0), (rs.UNSCORABLE, 0.0), (rs.OK, 1.0)])
    >>> (m["reward_mean"], round(m["reward_std"], 4), m["pass_rate"], m["status_unscorable"])
    (0.6666666666666666, 0.4714, 0.5, 1.0)
    """
    rewards = [r for status, r in results if status == rs.OK]
    counts = Counter(STATUS_NAMES.get(status, "error") for status, _ in results)
    total = len(results)
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if rewards else 0.0
    metrics = {
        "num_samples": float(total),
        "reward_mean": mean,
        "reward_std": std,
        "ok_rate": len(rewards) / total if total else 0.0,
        # A pass is an OK sample with a positive reward (a full pass for 0/1 scorers).
        "pass_rate": sum(1 for r in rewards if r > 0) / total if total else 0.0,
    }
    for name in STATUS_NAMES.values():
        metrics[f"status_{name}"] = float(counts.get(name, 0))
    return metrics


async def run(ctx: WorkerContext) -> dict[str, Any]:
    spec, params = ctx.spec, ctx.spec.params
    dataset = spec.eval_dataset or spec.train_dataset
    rows = await ctx.rows(dataset, limit=params.max_samples)
    ctx.events.emit("started", total_steps=len(rows))
    metadata = call_metadata(ctx.api_key, ctx.team)
    rollout_channel = aio_channel(ctx.job.rollout_address)
    reward_channel = aio_channel(ctx.job.reward_address)
    rollout = rollout_pb2_grpc.RolloutServiceStub(rollout_channel)
    reward = rs_grpc.RewardServiceStub(reward_channel)
    try:
        load = rollout_pb2.LoadModelRequest(model_revision=spec.base_model)
        await rollout.LoadModel(load, metadata=metadata)
        samples: list[rs.Sample] = []
        sampling = sampling_to_proto(params.sampling.__dict__)
        for start in range(0, len(rows), PROMPTS_PER_CALL):
            ctx.check_stop()
            batch = rows[start : start + PROMPTS_PER_CALL]
            request = rollout_pb2.GenerateRequest(
                prompts=[prompt_to_proto(r["prompt"]) for r in batch],
                sampling=sampling,
                request_id=f"{ctx.job.name}-{start}",
            )
            async for response in rollout.Generate(request, metadata=metadata):
                for c in response.completions:
                    samples.append(_sample(batch[c.prompt_index], start + c.prompt_index, c))
            done = min(start + PROMPTS_PER_CALL, len(rows))
            ctx.events.emit("metrics", step=done, epoch=1.0, values={"generated": len(samples)})
        results: list[tuple[int, float]] = []
        for start in range(0, len(samples), SAMPLES_PER_CALL):
            ctx.check_stop()
            score = rs.ScoreRequest(
                evaluator=spec.evaluator, samples=samples[start : start + SAMPLES_PER_CALL]
            )
            scored = await reward.Score(score, metadata=metadata)
            results += [(r.status, r.reward) for r in scored.results]
    finally:
        await rollout_channel.close(None)
        await reward_channel.close(None)
    metrics = summarize(results)
    ctx.events.emit("metrics", step=len(rows), epoch=1.0, values=metrics)
    return {"output_model_revision": "", "metrics": metrics}


def _sample(row: dict[str, Any], index: int, completion: rollout_pb2.Completion) -> rs.Sample:
    extra = {k: v for k, v in row.items() if k != "prompt"}
    return rs.Sample(
        sample_id=f"{index}-{completion.sample_index}",
        prompt=prompt_to_proto(row["prompt"]),
        completion=completion.text,
        metadata=to_struct(extra),
        group_id=str(index),
        completion_token_ids=list(completion.token_ids),
    )
