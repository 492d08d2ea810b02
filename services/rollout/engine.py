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

import torch

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
    model_slot: str | None = None  # which loaded model (see Engine.load_model); None: the last


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    max_queue: int = 256
    max_batch_prompts: int = 64
    vllm_logprobs_mode: str = "raw_logprobs"  # vLLM's engine-wide setting (SERVES_LOGPROBS)
    vllm_tensor_parallel_size: int = 1  # GPUs one vLLM engine spans
    vllm_gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM takes
    vllm_max_lora_rank: int = 64  # the largest adapter rank the vLLM engine can load


class Engine(Protocol):
    """Models are held under `slot` names the core picks (the weight cache's keys); `version` is
    what their completions report. A method's `slot=None` means the model loaded last."""

    name: str
    device: str
    max_queue: int
    max_resident: int  # full models held at once (0: as many as the cache budget allows)

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
        self,
        path: Path,
        version: str,
        dtype: str,
        max_model_len: int | None,
        slot: str | None = None,
    ) -> None:
        """Hold these full weights under `slot` (default: `version`), replacing what the slot
        held (and its adapters); requests already accepted keep the old weights."""

    async def unload_model(self, slot: str) -> None:
        """Drop a slot's weights; requests already accepted on them finish first."""

    async def push_weights(
        self,
        path: Path,
        slot: str,
        version: str,
        tensors: dict[str, torch.Tensor],
        reuse: str | None,
    ) -> None:
        """Hold under `slot` the model at `path` with `tensors` loaded over its weights. `reuse`:
        a slot of the same architecture that no request uses, whose weights may be overwritten
        in place (and which is then gone) instead of loading `path` again."""

    def context_len(self, slot: str | None = None) -> int: ...

    def model_bytes(self, slot: str | None = None) -> int: ...

    async def load_adapter(self, path: Path, version: str, slot: str | None = None) -> None: ...

    async def unload_adapter(self, version: str, slot: str | None = None) -> None:
        """Forget an adapter; requests already accepted on it finish first."""

    def encode(
        self, prompts: Sequence[PromptInput], slot: str | None = None
    ) -> list[list[int]]: ...

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
