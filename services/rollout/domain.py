"""The rollout domain: sampling parameters, requests, completions and errors. No grpc here.

A request is validated once (`SamplingSpec.validate`, shared with the trainer in
`services/specs/sampling.py`, and `check_prompt_lengths`) before it reaches an engine; engines
take token ids, never raw protobufs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
)
from services.specs.sampling import SamplingSpec
from tlm.common.v1 import common_pb2

MAX_PROMPTS = 1024  # the contract's bound on GenerateRequest.prompts
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # LoadModelRequest.dtype


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled or expired


class LogprobsMode(enum.Enum):
    """Which distribution a completion's log-probs come from (both before top-k/top-p)."""

    RAW = "raw"  # log_softmax(logits): temperature 1, whatever the sampling temperature
    # log_softmax(logits / T): what a trainer that divides by the sampling temperature computes
    TEMPERATURE_SCALED = "temperature_scaled"


# The temperature a mode divides the logits by before the log-softmax, given the sampling's.
LOGPROB_TEMPERATURE: dict[LogprobsMode, Callable[[float], float]] = {
    LogprobsMode.RAW: lambda temperature: 1.0,
    LogprobsMode.TEMPERATURE_SCALED: lambda temperature: temperature,
}


def check_logprobs_mode(mode: LogprobsMode, sampling: SamplingSpec) -> None:
    """Greedy decoding (temperature 0) has no temperature to scale by: refused, not read as
    raw, so a caller never gets numbers other than those it asked for."""
    if mode is LogprobsMode.TEMPERATURE_SCALED and sampling.temperature == 0:
        raise invalid(
            "sampling.logprobs_mode",
            "TEMPERATURE_SCALED needs a temperature > 0 (greedy decoding has none); use RAW",
        )


class NoModelLoaded(FailedPrecondition):
    """Generate or LoadAdapter before any LoadModel (for this team)."""


class AdapterIncompatible(FailedPrecondition):
    reason = common_pb2.MODEL_INCOMPATIBLE


class QueueFull(ResourceExhausted):
    """The bounded queue is full; the caller retries with backoff."""


class PolicyVersionUnknown(FailedPrecondition):
    """A pushed policy version this replica does not hold (never pushed here, evicted, or lost
    in a restart): the trainer pushes it again (WRONG_STATE, as for a model not loaded)."""


class CacheTooSmall(ResourceExhausted):
    """One model is larger than the whole weight cache budget."""


class PromptRejected(InvalidArgument):
    """The tokenizer could not render a prompt (no chat template, a role it refuses)."""


def invalid(field_path: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field_path}: {description}", violations=[FieldViolation(field_path, description)]
    )


@dataclass(frozen=True)
class PromptInput:
    """Raw text, or chat messages as (role, content) pairs for the tokenizer's chat template."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


def check_prompt_lengths(
    prompt_ids: Sequence[Sequence[int]], max_tokens: int, max_model_len: int
) -> None:
    """Every prompt is non-empty and fits the context together with max_tokens."""
    bad: list[FieldViolation] = []
    for i, ids in enumerate(prompt_ids):
        if not ids:
            bad.append(FieldViolation(f"prompts[{i}]", "is empty"))
        elif len(ids) + max_tokens > max_model_len:
            bad.append(
                FieldViolation(
                    f"prompts[{i}]",
                    f"{len(ids)} prompt tokens plus max_tokens {max_tokens} exceed the "
                    f"context of {max_model_len}",
                )
            )
    if bad:
        raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in bad), violations=bad)


@dataclass(frozen=True)
class Completion:
    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]  # per the request's LogprobsMode; empty when skip_logprobs
    finish_reason: FinishReason
    policy_version: str
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class LoadedAdapterInfo:
    revision: str
    load_time: float  # unix seconds


@dataclass(frozen=True)
class EngineStatusInfo:
    engine: str
    device: str
    model_revision: str
    adapters: list[LoadedAdapterInfo]
    queue_depth: int
    running: int
    max_queue: int
    tokens_per_second: float
    max_model_len: int
    max_n: int
    generated_tokens_total: int
    cached_models: list[str] = field(default_factory=list)  # this team's, least recent first
    cache_bytes: int = 0
    cache_budget_bytes: int = 0
