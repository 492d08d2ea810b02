"""All protobuf <-> domain conversion of the rollout service, in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator

from services.common.timestamps import to_timestamp
from services.rollout.domain import (
    Completion,
    EngineStatusInfo,
    FinishReason,
    LogprobsMode,
    PromptInput,
    SamplingSpec,
    invalid,
)
from services.rollout.push import PushHeader, TensorPiece
from tlm.common.v1 import common_pb2
from tlm.rollout.v1 import rollout_pb2

FINISH_REASONS = {
    FinishReason.STOP: rollout_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: rollout_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: rollout_pb2.FINISH_REASON_ABORT,
}
DEFAULTS = SamplingSpec()
LOGPROBS_MODES = {
    rollout_pb2.LOGPROBS_MODE_UNSPECIFIED: LogprobsMode.RAW,
    rollout_pb2.LOGPROBS_MODE_RAW: LogprobsMode.RAW,
    rollout_pb2.LOGPROBS_MODE_TEMPERATURE_SCALED: LogprobsMode.TEMPERATURE_SCALED,
}


def prompt_from_proto(prompt: common_pb2.Prompt) -> PromptInput:
    if prompt.HasField("messages"):
        turns = tuple((m.role, m.content) for m in prompt.messages.messages)
        return PromptInput(messages=turns)
    return PromptInput(text=prompt.text)


def sampling_from_proto(s: rollout_pb2.SamplingParams) -> SamplingSpec:
    return SamplingSpec(
        n=s.n if s.HasField("n") else DEFAULTS.n,
        temperature=s.temperature if s.HasField("temperature") else DEFAULTS.temperature,
        top_p=s.top_p if s.HasField("top_p") else DEFAULTS.top_p,
        top_k=s.top_k,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else DEFAULTS.max_tokens,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        skip_logprobs=s.skip_logprobs,
    )


def logprobs_mode_from_proto(s: rollout_pb2.SamplingParams) -> LogprobsMode:
    """proto3 enums are open: a number this version does not know is refused, naming the field."""
    if s.logprobs_mode not in LOGPROBS_MODES:
        known = ", ".join(rollout_pb2.LogprobsMode.keys())
        raise invalid("sampling.logprobs_mode", f"{s.logprobs_mode} is not one of {known}")
    return LOGPROBS_MODES[s.logprobs_mode]


def completion_to_proto(c: Completion) -> rollout_pb2.Completion:
    return rollout_pb2.Completion(
        prompt_index=c.prompt_index,
        sample_index=c.sample_index,
        text=c.text,
        token_ids=c.token_ids,
        logprobs=c.logprobs,
        finish_reason=FINISH_REASONS[c.finish_reason],
        policy_version=c.policy_version,
        prompt_token_ids=c.prompt_token_ids,
    )


def response_to_proto(completions: list[Completion]) -> rollout_pb2.GenerateResponse:
    return rollout_pb2.GenerateResponse(completions=[completion_to_proto(c) for c in completions])


def status_to_proto(s: EngineStatusInfo) -> rollout_pb2.EngineStatus:
    return rollout_pb2.EngineStatus(
        engine=s.engine,
        device=s.device,
        model_revision=s.model_revision,
        adapters=[
            rollout_pb2.LoadedAdapter(
                adapter_revision=a.revision, load_time=to_timestamp(a.load_time)
            )
            for a in s.adapters
        ],
        queue_depth=s.queue_depth,
        running=s.running,
        max_queue=s.max_queue,
        tokens_per_second=s.tokens_per_second,
        max_model_len=s.max_model_len,
        max_n=s.max_n,
        generated_tokens_total=s.generated_tokens_total,
        cached_models=s.cached_models,
        cache_bytes=s.cache_bytes,
        cache_budget_bytes=s.cache_budget_bytes,
    )


PUSHED_FORMATS = {
    rollout_pb2.PUSHED_WEIGHTS_FORMAT_FULL: False,
    rollout_pb2.PUSHED_WEIGHTS_FORMAT_LORA_ADAPTER: True,
}


async def push_from_proto(
    requests: AsyncIterator[rollout_pb2.PushWeightsRequest],
) -> tuple[PushHeader, AsyncIterator[TensorPiece]]:
    """A PushWeights stream -> its header and the rest of the stream as tensor pieces."""
    first = await anext(aiter(requests), None)
    if first is None or not first.HasField("header"):
        raise invalid("header", "the first message must carry the header")
    h = first.header
    if h.format not in PUSHED_FORMATS:
        raise invalid("header.format", "expected PUSHED_WEIGHTS_FORMAT_FULL or _LORA_ADAPTER")
    header = PushHeader(
        policy=h.policy,
        step=h.step,
        base_model_revision=h.base_model_revision,
        lora=PUSHED_FORMATS[h.format],
        adapter_config_json=h.adapter_config_json,
        tensor_count=h.tensor_count,
    )

    async def pieces() -> AsyncIterator[TensorPiece]:
        async for request in requests:
            if not request.HasField("chunk"):
                raise invalid("header", "only the first message may carry the header")
            c = request.chunk
            yield TensorPiece(c.name, c.dtype, tuple(c.shape), c.offset, c.data)

    return header, pieces()


def push_to_proto(
    header: PushHeader, pieces: Iterable[TensorPiece]
) -> Iterator[rollout_pb2.PushWeightsRequest]:
    """The client side (the trainer): header first, then one message per piece."""
    lora = rollout_pb2.PUSHED_WEIGHTS_FORMAT_LORA_ADAPTER
    full = rollout_pb2.PUSHED_WEIGHTS_FORMAT_FULL
    yield rollout_pb2.PushWeightsRequest(
        header=rollout_pb2.PushWeightsHeader(
            policy=header.policy,
            step=header.step,
            base_model_revision=header.base_model_revision,
            format=lora if header.lora else full,
            adapter_config_json=header.adapter_config_json,
            tensor_count=header.tensor_count,
        )
    )
    for p in pieces:
        chunk = rollout_pb2.TensorChunk(
            name=p.name, dtype=p.dtype, shape=p.shape, offset=p.offset, data=p.data
        )
        yield rollout_pb2.PushWeightsRequest(chunk=chunk)
