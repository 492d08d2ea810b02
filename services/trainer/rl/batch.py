"""Typed trajectories: what the controller passes between sampler, scorer, algorithms and actor.

No protobuf here (`grpc_ports` converts at the edge). Shapes: N = B prompts x G samples, laid
out group by group (sample i answers prompt i // G); L = the longest prompt + completion; T = the
longest completion. Per-token tensors are (N, T), right-padded with a 0/1 `mask`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

Row = dict[str, Any]  # a prompt dataset row: `prompt` (text or chat messages) and other columns


class ScoreStatus(enum.StrEnum):
    """The reward service's verdict on one sample; only OK has a reward."""

    OK = "ok"
    UNSCORABLE = "unscorable"
    TIMEOUT = "timeout"
    ERROR = "error"
    PENDING = "pending"


@dataclass(frozen=True)
class Sample:
    """One completion as the sampler made it. `logprobs` are the behaviour policy's per token
    (the rollout engine's), `policy_version` the policy that sampled it, `truncated` whether it
    stopped at max_tokens."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    policy_version: str
    truncated: bool = False


@dataclass(frozen=True)
class Score:
    """A sample's reward, meaningful only when `status` is OK; `scorers`: each scorer's value
    (OK scorers only)."""

    status: ScoreStatus
    reward: float = 0.0
    scorers: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Trajectories:
    """One generation batch: B rows, N = B * group_size samples and their scores; `trained`
    (N,) says which samples the loss may see (OK and not too stale)."""

    rows: list[Row]
    samples: list[Sample]
    scores: list[Score]
    group_size: int
    trained: list[bool]

    def rewards(self) -> torch.Tensor:
        """(N,) float32; NaN where the status is not OK (never read there)."""
        values = [s.reward if s.status is ScoreStatus.OK else float("nan") for s in self.scores]
        return torch.tensor(values, dtype=torch.float32)

    def valid(self) -> torch.Tensor:
        """(N,) bool: the samples in the loss."""
        return torch.tensor(self.trained, dtype=torch.bool)


@dataclass(frozen=True)
class TokenBatch:
    """Prompt + completion token ids, right-padded (so default position ids are the rollout's)."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    prompt_lens: list[int]  # (N,)
    completion_lens: list[int]  # (N,)
    sampling_logp: torch.Tensor  # (N, T) the behaviour policy's log-probs
    mask: torch.Tensor  # (N, T) 0/1: real completion tokens of samples in the loss

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Samples start..stop-1, trimmed to their own longest sequence (a micro-batch)."""
        prompt, completion = self.prompt_lens[start:stop], self.completion_lens[start:stop]
        length = max(p + c for p, c in zip(prompt, completion, strict=True))
        width = max(completion)
        return replace(
            self,
            input_ids=self.input_ids[start:stop, :length],
            attention_mask=self.attention_mask[start:stop, :length],
            prompt_lens=prompt,
            completion_lens=completion,
            sampling_logp=self.sampling_logp[start:stop, :width],
            mask=self.mask[start:stop, :width],
        )


def make_batch(
    samples: Sequence[Sample],
    valid: torch.Tensor,
    pad_id: int,
    device: str | torch.device = "cpu",
) -> TokenBatch:
    """Right-padded prompt + completion on the policy's device; valid: (N,) bool."""
    for i, s in enumerate(samples):
        if len(s.logprobs) != len(s.completion_ids):  # padding would misalign them
            raise RuntimeError(
                f"rollout sample {i} has {len(s.logprobs)} log-probs for "
                f"{len(s.completion_ids)} tokens"
            )
    seqs = [torch.tensor(s.prompt_ids + s.completion_ids) for s in samples]
    input_ids = pad_sequence(seqs, batch_first=True, padding_value=pad_id)  # (N, L)
    attention = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)  # (N, L)
    sampled = [torch.tensor(s.logprobs, dtype=torch.float32) for s in samples]
    sampling_logp = pad_sequence(sampled, batch_first=True)  # (N, T)
    present = pad_sequence([torch.ones(len(s.completion_ids)) for s in samples], batch_first=True)
    return TokenBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        prompt_lens=[len(s.prompt_ids) for s in samples],
        completion_lens=[len(s.completion_ids) for s in samples],
        sampling_logp=sampling_logp.to(device),
        mask=(present * valid.unsqueeze(1).float()).to(device),  # (N, T)
    )
