"""The RolloutService servicer: convert, call the core, convert back. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common.auth import current_team
from services.rollout import convert
from services.rollout.core import RolloutCore
from services.rollout.push import assemble
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, core: RolloutCore) -> None:
        self.core = core

    async def Generate(
        self, request: rollout_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rollout_pb2.GenerateResponse]:
        stream = self.core.generate(
            [convert.prompt_from_proto(p) for p in request.prompts],
            convert.sampling_from_proto(request.sampling),
            request.adapter_revision,
            request.return_prompt_token_ids,
            current_team(),
            convert.logprobs_mode_from_proto(request.sampling),
            request.model_revision,
        )
        try:
            async for completions in stream:
                yield convert.response_to_proto(completions)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # cancels the rest on disconnect

    async def LoadModel(
        self, request: rollout_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.LoadModelResponse:
        team = current_team()
        version = await self.core.load_model(
            request.model_revision, team, request.dtype, request.max_model_len
        )
        status = convert.status_to_proto(self.core.status(team))
        return rollout_pb2.LoadModelResponse(policy_version=version, status=status)

    async def LoadAdapter(
        self, request: rollout_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.LoadAdapterResponse:
        version = await self.core.load_adapter(request.adapter_revision, current_team())
        return rollout_pb2.LoadAdapterResponse(policy_version=version)

    async def UnloadAdapter(
        self, request: rollout_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.UnloadAdapterResponse:
        await self.core.unload_adapter(request.adapter_revision, current_team())
        return rollout_pb2.UnloadAdapterResponse()

    async def PushWeights(
        self,
        request_iterator: AsyncIterator[rollout_pb2.PushWeightsRequest],
        context: grpc.aio.ServicerContext,
    ) -> rollout_pb2.PushWeightsResponse:
        header, pieces = await convert.push_from_proto(request_iterator)
        header.check()  # before the bytes arrive
        tensors = await assemble(pieces, header.tensor_count)
        version = await self.core.push(header, tensors, current_team())
        received = sum(t.numel() * t.element_size() for t in tensors.values())
        return rollout_pb2.PushWeightsResponse(policy_version=version, bytes_received=received)

    async def GetEngineStatus(
        self, request: rollout_pb2.GetEngineStatusRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.EngineStatus:
        return convert.status_to_proto(self.core.status(current_team()))
