"""The rollout service's client: generation (server-streaming), model and adapter loading,
engine status."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable

from services.clients.base import ServiceClient
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc


class RolloutClient(ServiceClient):
    """Async client of the RolloutService."""

    service = "rollout"
    descriptor = rollout_pb2.DESCRIPTOR
    stub_class = rollout_pb2_grpc.RolloutServiceStub

    def generate(
        self,
        request: rollout_pb2.GenerateRequest,
        team: str | None = None,
        timeout_s: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> AsyncIterator[rollout_pb2.GenerateResponse]:
        """The responses as they come. Retried (UNAVAILABLE, and DEADLINE_EXCEEDED: Generate
        carries a request id) only before the first one arrives; `metadata` replaces the
        client's for this call."""
        return self._stream(self.stub.Generate, request, team, timeout_s, metadata)

    async def generate_all(
        self,
        request: rollout_pb2.GenerateRequest,
        team: str | None = None,
        timeout_s: float | None = None,
    ) -> list[rollout_pb2.Completion]:
        """Every completion of the request, in arrival order."""
        return [c async for r in self.generate(request, team, timeout_s) for c in r.completions]

    async def load_model(
        self, model_revision: str, team: str | None = None, timeout_s: float | None = None
    ) -> rollout_pb2.LoadModelResponse:
        request = rollout_pb2.LoadModelRequest(model_revision=model_revision)
        return await self._call(self.stub.LoadModel, request, team, timeout_s)

    async def load_adapter(
        self, adapter_revision: str, team: str | None = None, timeout_s: float | None = None
    ) -> rollout_pb2.LoadAdapterResponse:
        request = rollout_pb2.LoadAdapterRequest(adapter_revision=adapter_revision)
        return await self._call(self.stub.LoadAdapter, request, team, timeout_s)

    async def unload_adapter(
        self, adapter_revision: str, team: str | None = None
    ) -> rollout_pb2.UnloadAdapterResponse:
        request = rollout_pb2.UnloadAdapterRequest(adapter_revision=adapter_revision)
        return await self._call(self.stub.UnloadAdapter, request, team)

    async def engine_status(
        self, team: str | None = None, timeout_s: float | None = None
    ) -> rollout_pb2.EngineStatus:
        request = rollout_pb2.GetEngineStatusRequest()
        return await self._call(self.stub.GetEngineStatus, request, team, timeout_s)

    async def push_weights(
        self,
        requests: Iterable[rollout_pb2.PushWeightsRequest]
        | AsyncIterable[rollout_pb2.PushWeightsRequest],
        team: str | None = None,
        timeout_s: float | None = None,
    ) -> rollout_pb2.PushWeightsResponse:
        """Stream a policy's weights (header, then tensor pieces) to this replica. Retried on
        UNAVAILABLE only while gRPC still holds what it sent (its 256 KiB retry buffer)."""
        return await self._call(self.stub.PushWeights, requests, team, timeout_s)
