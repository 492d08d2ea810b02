"""The engine interface every generation backend implements, and the table that picks one.

Engines take token ids (the core tokenizes and validates first), report the policy version
on every completion, and keep requests that are already running on the weights they started
with when a model or adapter is replaced.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.errors import InvalidArgument
from services.rollout.domain import Completion, LogprobsMode, PromptInput, SamplingSpec


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: list[list[int]]
    sampling: SamplingSpec
    adapter_version: str | None  # a loaded adapter revision, None for the base model
    return_prompt_ids: bool = False
    # Not in SamplingSpec: the trainer's job specs reuse that class, and the trainer picks the
    # mode itself (a job spec cannot set it).
    logprobs_mode: LogprobsMode = LogprobsMode.RAW


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    max_queue: int = 256
    max_batch_prompts: int = 64
    vllm_logprobs_mode: str = "raw_logprobs"  # vLLM's engine-wide setting (SERVES_LOGPROBS)


class Engine(Protocol):
    name: str
    device: str
    max_queue: int

    @property
    def max_model_len(self) -> int: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def running(self) -> int: ...

    @property
    def generated_tokens_total(self) -> int: ...

    def tokens_per_second(self) -> float: ...

    async def load_model(
        self, path: Path, version: str, dtype: str, max_model_len: int | None
    ) -> None:
        """Serve these full weights; drops every adapter (they belong to the old base)."""

    async def load_adapter(self, path: Path, version: str) -> None: ...

    async def unload_adapter(self, version: str) -> None:
        """Forget an adapter; requests already accepted on it finish first."""

    def encode(self, prompts: Sequence[PromptInput]) -> list[list[int]]: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[list[Completion]]:
        """Completions in groups, as they finish; closing the iterator cancels the rest."""

    async def close(self) -> None: ...


def _transformers(config: EngineConfig) -> Engine:
    from services.rollout.transformers_engine import TransformersEngine

    return TransformersEngine(config)


def _vllm(config: EngineConfig) -> Engine:
    from services.rollout.vllm_engine import VllmEngine

    return VllmEngine(config)


ENGINES: dict[str, Callable[[EngineConfig], Engine]] = {
    "transformers": _transformers,
    "vllm": _vllm,
}


def make_engine(name: str, config: EngineConfig) -> Engine:
    if name not in ENGINES:
        raise InvalidArgument(f"unknown engine {name!r}; expected one of {sorted(ENGINES)}")
    return ENGINES[name](config)
