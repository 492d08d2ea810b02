"""Evaluation through the ports: generate on prompt rows, score, summarise. EVALUATE jobs and
the controller's `eval_every` both run it, so there is one path from rows to reward metrics."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from services.trainer.rl.batch import Row, Score, ScoreStatus
from services.trainer.rl.ports import PolicyRef, Sampler, Scorer
from services.trainer.spec import Sampling

CHUNK = 64  # prompts generated and scored at a time (progress, cancellation)


def summarize(scores: Sequence[Score]) -> dict[str, float]:
    """Scores -> metrics. Only OK samples have a reward; the others are counted, never averaged
    in as zeros.

    >>> ok, bad = ScoreStatus.OK, ScoreStatus.UNSCORABLE
    >>> m = summarize([Score(ok, 1.0), Score(ok, 0.0), Score(bad), Score(ok, 1.0)])
    >>> (m["reward_mean"], round(m["reward_std"], 4), m["pass_rate"], m["status_unscorable"])
    (0.6666666666666666, 0.4714, 0.5, 1.0)
    """
    rewards = [s.reward for s in scores if s.status is ScoreStatus.OK]
    counts = Counter(s.status for s in scores)
    total = len(scores)
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
    for status in ScoreStatus:
        metrics[f"status_{status}"] = float(counts.get(status, 0))
    return metrics


async def evaluate(
    rows: list[Row],
    sampler: Sampler,
    scorer: Scorer,
    sampling: Sampling,
    policy: PolicyRef,
    tag: str,
    on_chunk: Callable[[int], None] = lambda done: None,
) -> dict[str, float]:
    """`sampling.n` samples per row from `policy`, scored; `on_chunk(rows done)` after each
    chunk (progress, and a place to stop)."""
    scores: list[Score] = []
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        samples = await sampler.generate(chunk, sampling, policy, f"{tag}-{start}")
        scores += await scorer.score(chunk, samples, sampling.n or 1, f"{tag}-{start}")
        on_chunk(start + len(chunk))
    return summarize(scores)
