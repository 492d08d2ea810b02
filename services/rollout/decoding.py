"""The transformers decode loop: left-padded batch, KV cache, one token per row per step.

Runs in a worker thread. Each row samples with its own torch.Generator, so its tokens depend
on its seed only; log-probs are the log-softmax of the same logits the sampler used, divided by
the row's own `logprob_temperature` (1: raw; the sampling temperature: temperature-scaled), so
one batch mixes requests of either mode. Finished and cancelled rows are pruned from the batch
(and the cache) as soon as they end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from services.rollout.domain import FinishReason
from services.rollout.sampling import find_stop, next_tokens


@dataclass
class Row:
    """One sequence being generated: a prompt's sample with its own sampling state."""

    prompt_ids: list[int]
    generator: torch.Generator
    temperature: float
    logprob_temperature: float  # log-probs are log_softmax(logits / this), before top-k/top-p
    top_k: int
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    owner: Any  # the request this row belongs to (has a `.cancelled` flag)
    prompt_index: int
    sample_index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish: FinishReason | None = None


# Uniforms drawn per row at a time: one torch.rand call per row per DRAW_BLOCK steps, not per
# step. A generator yields the same stream in blocks as one value at a time.
DRAW_BLOCK = 32

Forward = Callable[..., Any]  # model(input_ids, attention_mask, position_ids, cache, ...)


@dataclass(frozen=True)
class DecodeContext:
    forward: Forward
    eos_ids: frozenset[int]
    pad_id: int
    device: torch.device
    decode_text: Callable[[list[int]], str]
    on_finish: Callable[[Row], None]  # called from this thread as each row ends (not aborted)
    on_tokens: Callable[[int], None] = lambda n: None  # tokens generated this step


def left_pad(
    prompts: Sequence[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, position_ids, each (B, T); positions count real tokens only."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)  # (B, T)
    return ids, mask, positions


def decode(rows: list[Row], ctx: DecodeContext) -> None:
    """Generate until every row stops, hits max_tokens or is cancelled."""
    dev = ctx.device
    ids, mask, positions = (t.to(dev) for t in left_pad([r.prompt_ids for r in rows], ctx.pad_id))
    temperature = torch.tensor([r.temperature for r in rows], device=dev)  # (B,)
    logprob_t = torch.tensor([r.logprob_temperature for r in rows], device=dev)  # (B,)
    top_k = torch.tensor([r.top_k for r in rows], dtype=torch.long, device=dev)  # (B,)
    top_p = torch.tensor([r.top_p for r in rows], device=dev)  # (B,)
    active, cache, step = list(rows), None, 0
    draws = torch.empty(0, 0)  # (B, DRAW_BLOCK) uniforms, one row's draws from its generator
    with torch.inference_mode():
        while active:
            if step % DRAW_BLOCK == 0:
                draws = torch.stack([torch.rand(DRAW_BLOCK, generator=r.generator) for r in active])
            uniforms = draws[:, step % DRAW_BLOCK]  # (B,)
            step += 1
            out = ctx.forward(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.cache
            logits = out.logits[:, -1, :].float()  # (B, V)
            chosen = next_tokens(logits, temperature, top_k, top_p, uniforms.to(dev))  # (B,)
            scaled = logits / logprob_t.unsqueeze(1)  # (B, V)
            logprobs = torch.log_softmax(scaled, dim=-1).gather(1, chosen.unsqueeze(1))  # (B, 1)
            chosen_list, logprob_list = chosen.tolist(), logprobs.squeeze(1).tolist()
            ctx.on_tokens(len(active))
            keep = [
                i
                for i, r in enumerate(active)
                if _step_row(r, chosen_list[i], logprob_list[i], ctx)
            ]
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep, device=dev)
                cache.batch_select_indices(index)
                draws = draws[torch.tensor(keep)]
                chosen, mask = chosen[index], mask[index]
                positions, temperature = positions[index], temperature[index]
                logprob_t = logprob_t[index]
                top_k, top_p = top_k[index], top_p[index]
                active = [active[i] for i in keep]
            ids = chosen.unsqueeze(1)  # (B, 1)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)  # (B, T + 1)
            positions = positions[:, -1:] + 1  # (B, 1)


def _step_row(row: Row, token: int, logprob: float, ctx: DecodeContext) -> bool:
    """Append one token; True while the row goes on. Cancelled rows end without a callback."""
    if row.owner.cancelled:
        row.finish = FinishReason.ABORT
        return False
    row.tokens.append(token)
    row.logprobs.append(logprob)
    text: str | None = None
    if token in ctx.eos_ids:
        row.finish = FinishReason.STOP
    elif row.stop:
        text = ctx.decode_text(row.tokens)
        longest = max(len(s) for s in row.stop)
        cut = find_stop(text, row.stop, max(0, len(row.text) - longest))
        if cut is not None:
            text, row.finish = text[:cut], FinishReason.STOP
        row.text = text
    if row.finish is None and len(row.tokens) >= row.max_tokens:
        row.finish = FinishReason.LENGTH
    if row.finish is None:
        return True
    row.text = ctx.decode_text(row.tokens) if text is None else text
    ctx.on_finish(row)
    return False
