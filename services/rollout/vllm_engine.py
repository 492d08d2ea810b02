"""The `vllm` engine (GPU, optional extra): the same contract on vLLM's async engine.

vLLM is imported lazily, so this module imports on machines without it. vLLM batches
continuously by itself; we submit one vLLM request per prompt (n samples each) and stream each
prompt's samples when they finish. LoRA adapters ride as LoRARequests; log-probs are vLLM's
sampled-token log-probs. vLLM's `logprobs_mode` is an engine setting, not a request's
(`TLM_ROLLOUT_VLLM_LOGPROBS_MODE`): a request whose LogprobsMode the running engine's numbers do
not equal is refused (FAILED_PRECONDITION), never answered with other numbers. A vLLM without
that option is refused at LoadModel.

Pinned release: the `vllm` extra of pyproject.toml (vLLM 0.30.0, built on torch 2.13.0, the
base pin). A replica configured for vLLM where vLLM does not import refuses to start (no silent
fall back to transformers: a GPU deployment that quietly serves from the CPU engine is slower by
orders of magnitude and reports other log-probs). vLLM's request validation errors
(`vllm.exceptions.VLLMValidationError`, a VLLMClientError and no longer a ValueError, and plain
ValueErrors from older checks) become INVALID_ARGUMENT naming the field.

NOTE: written against vLLM's documented AsyncLLMEngine (= v1 AsyncLLM) API; it has never run
in this repository's CI (no GPU there). Its tests are marked `gpu`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import itertools
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.rollout.domain import (
    Completion,
    FinishReason,
    LogprobsMode,
    NoModelLoaded,
    PromptInput,
    QueueFull,
    SamplingSpec,
    invalid,
)
from services.rollout.engine import EngineConfig, EngineRequest
from services.rollout.hf_weights import DTYPES, encode_prompt
from services.rollout.sampling import derive_seed
from services.rollout.scheduler import Throughput
from tlm.common.v1 import common_pb2

log = structlog.get_logger("tlm.rollout.vllm")

FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
MAX_LORAS = 2  # a new adapter revision loads while requests still run on the old one
# Whether an engine started with vLLM's `logprobs_mode` reports the numbers a request's mode asks
# for. vLLM v1's Sampler: raw_logprobs = log_softmax(logits) before any processing (at any
# temperature, equal to TEMPERATURE_SCALED only at temperature 1); processed_logprobs =
# log_softmax of the logits after penalties (none here), temperature (1 for greedy rows) and the
# top-k/top-p mask, so it equals TEMPERATURE_SCALED (or RAW at temperature 0 or 1) only when no
# top-k/top-p cuts the distribution (renormalised over the kept tokens otherwise).
SERVES_LOGPROBS: dict[str, Callable[[LogprobsMode, SamplingSpec], bool]] = {
    "raw_logprobs": lambda mode, s: mode is LogprobsMode.RAW or s.temperature == 1,
    "processed_logprobs": lambda mode, s: (
        s.top_k == 0
        and s.top_p == 1
        and (mode is LogprobsMode.TEMPERATURE_SCALED or s.temperature in (0, 1))
    ),
}


@dataclass(eq=False)
class _Lora:
    version: str
    request: Any  # vllm.lora.request.LoRARequest
    users: int = 0
    retired: bool = False


def completion_from_output(
    output: Any, prompt_index: int, version: str, prompt_ids: list[int], request: EngineRequest
) -> Completion:
    """One vLLM CompletionOutput -> Completion (logprobs: one {token_id: Logprob} per token)."""
    token_ids = list(output.token_ids)
    logprobs = []
    if not request.sampling.skip_logprobs and output.logprobs is not None:
        logprobs = [
            float(step[t].logprob) for step, t in zip(output.logprobs, token_ids, strict=True)
        ]
    return Completion(
        prompt_index=prompt_index,
        sample_index=int(output.index),
        text=output.text,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=FINISH.get(output.finish_reason or "abort", FinishReason.ABORT),
        policy_version=version,
        prompt_token_ids=prompt_ids if request.return_prompt_ids else [],
    )


def check_logprobs_mode(engine_mode: str, request: EngineRequest) -> None:
    """FAILED_PRECONDITION when the engine, as started, cannot report the log-probs asked for."""
    s, mode = request.sampling, request.logprobs_mode
    if s.skip_logprobs or SERVES_LOGPROBS[engine_mode](mode, s):
        return
    raise FailedPrecondition(
        f"sampling.logprobs_mode {mode.name} at temperature {s.temperature:g}, top_k {s.top_k}, "
        f"top_p {s.top_p:g} is not what this vLLM engine reports: it was started with "
        f"logprobs_mode {engine_mode} (TLM_ROLLOUT_VLLM_LOGPROBS_MODE; processed_logprobs "
        "serves TEMPERATURE_SCALED without top-k/top-p)"
    )


def require_vllm() -> None:
    """Refuse to start (SystemExit, one clear line) when vLLM does not import here."""
    try:
        importlib.import_module("vllm")
    except (ImportError, OSError) as exc:  # OSError: a CUDA library vLLM links is missing
        raise SystemExit(
            f"TLM_ROLLOUT_ENGINE=vllm, but vLLM does not import ({exc}): install the `vllm` "
            "extra on a CUDA host (pip install '.[vllm]', or the deploy/ GPU image), or set "
            "TLM_ROLLOUT_ENGINE=transformers"
        ) from exc


def request_errors() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a request it refuses: `VLLMValidationError` (vllm.exceptions, since
    0.2x; not a ValueError) and the ValueErrors of its older checks."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMValidationError)


def rejected(field: str, exc: BaseException) -> InvalidArgument:
    """INVALID_ARGUMENT for a request vLLM refused; VLLMValidationError names its parameter
    (`sampling.top_k`), a plain ValueError only the part of the request (`sampling`)."""
    parameter = getattr(exc, "parameter", None)
    where = f"{field}.{parameter}" if field == "sampling" and parameter else field
    return invalid(where, f"rejected by vLLM: {exc}")


def device_ids(device: str, tensor_parallel_size: int) -> list[int] | None:
    """vLLM's `device_ids` for TLM_ROLLOUT_DEVICE: "cuda:2" with 2 GPUs -> [2, 3]; None (vLLM's
    default, the first visible GPUs) for "cuda" or "cpu" (the setting's CPU default).

    >>> device_ids("cuda:2", 2), device_ids("cuda", 4), device_ids("cpu", 1)
    ([2, 3], None, None)
    """
    if not device.startswith("cuda:"):
        return None
    first = int(device.removeprefix("cuda:"))
    return list(range(first, first + tensor_parallel_size))


def adapter_rank(path: Path) -> int | None:
    """The LoRA rank `r` of a PEFT adapter folder, None when its config does not say."""
    try:
        rank = json.loads((path / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError, AttributeError):
        return None
    return rank if isinstance(rank, int) else None


class VllmEngine:
    name = "vllm"
    max_resident = 1  # one engine per GPU: the weight cache holds one model

    def __init__(self, config: EngineConfig) -> None:
        require_vllm()
        self.device = config.device if config.device != "cpu" else "cuda"
        self.max_queue = config.max_queue
        self.logprobs_mode = config.vllm_logprobs_mode  # vLLM's, for the whole engine
        self.tensor_parallel_size = config.vllm_tensor_parallel_size
        self.gpu_memory_utilization = config.vllm_gpu_memory_utilization
        self.max_lora_rank = config.vllm_max_lora_rank
        self._engine: Any = None
        self._tokenizer: Any = None
        self._version = ""
        self._slot = ""  # the weight cache's name for the served model
        self._max_model_len = 0
        self._loras: dict[str, _Lora] = {}
        self._lora_ids = itertools.count(1)
        self._in_flight = 0
        self._draining = False  # a LoadModel waits for running requests: accept no new ones
        self._options: dict[str, Any] = {}  # the running engine's arguments (to restore it)
        self._meter = Throughput()

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def queue_depth(self) -> int:
        return 0  # vLLM queues internally; every accepted request counts as running

    @property
    def running(self) -> int:
        return self._in_flight

    @property
    def generated_tokens_total(self) -> int:
        return self._meter.total

    def tokens_per_second(self) -> float:
        return self._meter.rate()

    def context_len(self, slot: str | None = None) -> int:
        return self._max_model_len

    def model_bytes(self, slot: str | None = None) -> int:
        return 0  # vLLM takes gpu_memory_utilization of the GPU, whatever the weights' size

    async def unload_model(self, slot: str) -> None:
        """Nothing to free early: the next load_model replaces the one engine."""

    async def load_model(
        self,
        path: Path,
        version: str,
        dtype: str,
        max_model_len: int | None,
        slot: str | None = None,
    ) -> None:
        """Drain, shut the old engine down (one engine fits the GPU), start the new one; if it
        fails to start, start the old one again (its adapters too) and re-raise."""
        from vllm import AsyncEngineArgs

        if dtype not in DTYPES:
            raise invalid("dtype", f"expected one of {sorted(DTYPES)}, got {dtype!r}")
        fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        if "logprobs_mode" not in fields:
            raise FailedPrecondition(
                "the installed vLLM has no logprobs_mode option, and the contract needs it to "
                "know which log-probs it reports: install a vLLM release that has "
                "EngineArgs.logprobs_mode"
            )
        options: dict[str, Any] = {
            "model": str(path),
            "dtype": dtype,
            "max_model_len": max_model_len,
            "enable_lora": True,
            "max_lora_rank": self.max_lora_rank,
            "max_loras": MAX_LORAS,
            "logprobs_mode": self.logprobs_mode,
            "worker_extension_cls": WEIGHT_PUSH_EXTENSION,  # PushWeights, in place
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }
        ids = device_ids(self.device, self.tensor_parallel_size)
        if ids is not None:
            if "device_ids" not in fields:
                raise FailedPrecondition(
                    f"TLM_ROLLOUT_DEVICE={self.device} needs vLLM's device_ids option, which the "
                    "installed vLLM lacks: use the pinned release, or CUDA_VISIBLE_DEVICES"
                )
            options["device_ids"] = ids
        self._draining = True
        try:
            while self._in_flight:
                await asyncio.sleep(0.05)
            old = (self._options, self._version, list(self._loras.values()))
            await self._shutdown()
            try:
                await self._start(options, version)
                self._slot = slot or version
            except BaseException:
                if old[0]:
                    await self._restore(*old)
                raise
        finally:
            self._draining = False

    async def _start(self, options: dict[str, Any], version: str) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(**options)
        engine = await asyncio.to_thread(AsyncLLMEngine.from_engine_args, args)
        try:
            tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, options["model"])
            config = getattr(engine, "model_config", None)  # v1 AsyncLLM: an attribute
            if config is None:
                config = await engine.get_model_config()  # older AsyncLLMEngine
        except BaseException:
            await asyncio.to_thread(engine.shutdown)
            raise
        self._engine, self._tokenizer, self._options = engine, tokenizer, options
        self._version, self._loras = version, {}
        self._max_model_len = int(config.max_model_len)

    async def _restore(self, options: dict[str, Any], version: str, loras: list[_Lora]) -> None:
        try:
            await self._start(options, version)
            for lora in loras:
                await self._engine.add_lora(lora.request)
                self._loras[lora.version] = _Lora(lora.version, lora.request)
        except Exception as exc:
            log.error("vllm_restore_failed", model=options.get("model"), exc_info=exc)
            await self._shutdown()

    async def _shutdown(self) -> None:
        engine, self._engine = self._engine, None
        self._tokenizer, self._options, self._version = None, {}, ""
        self._loras, self._max_model_len = {}, 0
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    async def load_adapter(self, path: Path, version: str, slot: str | None = None) -> None:
        if self._engine is None:
            raise NoModelLoaded("no model is loaded; call LoadModel first")
        rank = adapter_rank(path)
        if rank is not None and rank > self.max_lora_rank:
            raise FailedPrecondition(
                f"the adapter's LoRA rank {rank} is above this vLLM engine's max_lora_rank "
                f"{self.max_lora_rank} (TLM_ROLLOUT_VLLM_MAX_LORA_RANK)",
                reason=common_pb2.MODEL_INCOMPATIBLE,
            )
        if version not in self._loras:
            from vllm.lora.request import LoRARequest

            request = LoRARequest(version, next(self._lora_ids), str(path))
            await self._engine.add_lora(request)
            self._loras[version] = _Lora(version, request)

    async def unload_adapter(self, version: str, slot: str | None = None) -> None:
        lora = self._loras.pop(version, None)
        if lora is not None:
            lora.retired = True
            await self._collect(lora)

    async def _collect(self, lora: _Lora) -> None:
        if lora.retired and lora.users == 0 and self._engine is not None:
            await self._engine.remove_lora(lora.request.lora_int_id)

    def encode(self, prompts: Sequence[PromptInput], slot: str | None = None) -> list[list[int]]:
        if self._tokenizer is None:
            raise NoModelLoaded("no model is loaded; call LoadModel first")
        return [encode_prompt(self._tokenizer, p) for p in prompts]

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[Completion]]:
        if self._draining:
            raise Unavailable("a model is being loaded on this replica; retry shortly")
        if self._engine is None:
            raise NoModelLoaded("no model is loaded; call LoadModel first")
        check_logprobs_mode(self.logprobs_mode, request)
        if request.model_slot not in (None, self._slot):  # the one engine moved on meanwhile
            raise Unavailable("this replica switched models; retry")
        if self._in_flight >= self.max_queue:
            raise QueueFull(f"the rollout queue is full ({self.max_queue} requests)")
        lora = self._loras.get(request.adapter_version or "")
        if request.adapter_version and lora is None:
            raise NoModelLoaded(f"adapter {request.adapter_version} is not loaded")
        version = lora.version if lora else self._version
        self._in_flight += 1
        if lora:
            lora.users += 1
        out: asyncio.Queue[Any] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._one_prompt(request, i, lora, version, out))
            for i in range(len(request.prompt_ids))
        ]
        try:
            for _ in tasks:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()  # closing vLLM's generator aborts its request
            self._in_flight -= 1
            if lora:
                lora.users -= 1
                await self._collect(lora)

    async def _one_prompt(
        self, request: EngineRequest, index: int, lora: _Lora | None, version: str, out: Any
    ) -> None:
        """Always puts exactly one item on `out`: the prompt's completions or an error."""
        prompt_ids = request.prompt_ids[index]
        try:
            params = _sampling_params(request, index)
            final = None
            try:
                async for partial in self._engine.generate(
                    {"prompt_token_ids": prompt_ids},
                    params,
                    request_id=uuid.uuid4().hex,
                    lora_request=lora.request if lora else None,
                ):
                    final = partial  # FINAL_ONLY: one output, when every sample is done
            except request_errors() as exc:  # vLLM's request validation (length, ids, ...)
                raise rejected(f"prompts[{index}]", exc) from exc
            assert final is not None
            done = [
                completion_from_output(o, index, version, prompt_ids, request)
                for o in final.outputs
            ]
            self._meter.add(sum(len(c.token_ids) for c in done))
            out.put_nowait(done)
        except Exception as exc:
            out.put_nowait(exc)

    async def close(self) -> None:
        await self._shutdown()

    # Weight push (PushWeights) -- owned by the rollout-at-scale work ------------------------
    # Written against vLLM's documented in-place paths, never run here (no GPU in CI): full
    # weights go to every worker by `AsyncLLM.collective_rpc` into the method that
    # `worker_extension_cls` mixes into vLLM's worker (vLLM's RLHF example pattern), which calls
    # the model's own `load_weights` (it shards for tensor parallelism); the prefix cache is
    # reset since its KV entries came from the old weights. Adapters need nothing here: the core
    # writes a pushed adapter as a PEFT folder and calls load_adapter (add_lora, no restart).

    async def push_weights(
        self,
        path: Path,
        slot: str,
        version: str,
        tensors: dict[str, Any],
        reuse: str | None,
    ) -> None:
        """Drain, then overwrite the served weights in place. If the engine serves neither the
        reused slot nor `path`, start it on `path` first (the one restart of a job's run)."""
        if self._engine is None or (
            reuse != self._slot and self._options.get("model") != str(path)
        ):
            await self.load_model(path, version, "auto", None, slot)
        self._draining = True
        try:
            while self._in_flight:
                await asyncio.sleep(0.05)
            weights = list(tensors.items())
            await self._engine.collective_rpc("tlm_load_weights", args=(weights,))
            await self._engine.reset_prefix_cache()
            self._version, self._slot = version, slot
        finally:
            self._draining = False


WEIGHT_PUSH_EXTENSION = "services.rollout.vllm_engine.WeightPushExtension"


class WeightPushExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`); `self` is the worker."""

    model_runner: Any

    def tlm_load_weights(self, weights: list[tuple[str, Any]]) -> None:
        device = next(self.model_runner.model.parameters()).device
        self.model_runner.model.load_weights(weights=[(n, t.to(device)) for n, t in weights])


def _sampling_params(request: EngineRequest, index: int) -> Any:
    """vLLM SamplingParams for one prompt; its validation errors become INVALID_ARGUMENT."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = request.sampling
    refused: tuple[type[BaseException], ...] = (*request_errors(), TypeError)
    seed = secrets.randbits(63) if s.seed is None else derive_seed(s.seed, index, 0)
    try:
        return SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,  # vLLM: -1 disables (0 in newer releases too)
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            seed=seed,
            logprobs=None if s.skip_logprobs else 0,  # 0: only the sampled token's log-prob
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
    except refused as exc:
        raise rejected("sampling", exc) from exc
