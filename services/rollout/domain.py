"""The rollout domain: sampling parameters, requests, completions and errors. No grpc here.

A request is validated once (`SamplingSpec.validate`, `check_prompt_lengths`) before it reaches
an engine; engines take token ids, never raw protobufs.
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
from tlm.common.v1 import common_pb2

MAX_PROMPTS = 1024  # the contract's bound on GenerateRequest.prompts
# Both engines sample at temperatures in [0, MAX_TEMPERATURE] (the OpenAI API's bound);
# above it the distribution is close to uniform over the vocabulary.
MAX_TEMPERATURE = 2.0
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


class ModelOwnedByAnotherTeam(FailedPrecondition):
    """LoadModel from a team while another team's model is loaded and in use."""


class PromptRejected(InvalidArgument):
    """The tokenizer could not render a prompt (no chat template, a role it refuses)."""


def invalid(field_path: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field_path}: {description}", violations=[FieldViolation(field_path, description)]
    )


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling shared by every prompt of a request; defaults follow the contract."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    skip_logprobs: bool = False

    def validate(self, max_n: int, max_model_len: int) -> None:
        """Raise InvalidArgument naming every bad field (`sampling.top_p`, ...)."""
        bad = self.problems(max_n, max_model_len)
        if bad:
            raise InvalidArgument(
                "; ".join(f"{v.field}: {v.description}" for v in bad), violations=bad
            )

    def problems(
        self, max_n: int, max_model_len: int, at: str = "sampling"
    ) -> list[FieldViolation]:
        """Every bad field, named under `at`; the trainer checks job specs with the same rules."""
        bad: list[FieldViolation] = []
        if not 1 <= self.n <= max_n:
            bad.append(FieldViolation(f"{at}.n", f"must be in [1, {max_n}], got {self.n}"))
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also catches NaN and inf
            bad.append(FieldViolation(f"{at}.temperature", f"must be in [0, {MAX_TEMPERATURE:g}]"))
        elif self.temperature == 0 and 1 < self.n <= max_n:
            bad.append(
                FieldViolation(
                    f"{at}.n",
                    "must be 1 with temperature 0 (greedy decoding gives n identical completions)",
                )
            )
        if not 0 < self.top_p <= 1:
            bad.append(FieldViolation(f"{at}.top_p", "must be in (0, 1]"))
        if self.top_k < 0:
            bad.append(FieldViolation(f"{at}.top_k", "must be >= 0 (0 disables)"))
        if not 1 <= self.max_tokens <= max_model_len:
            bad.append(
                FieldViolation(f"{at}.max_tokens", f"must be in [1, {max_model_len}] (the context)")
            )
        if any(not s for s in self.stop):
            bad.append(FieldViolation(f"{at}.stop", "stop strings must be non-empty"))
        return bad


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
