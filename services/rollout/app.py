"""Wiring of the rollout service: engine + weights source + core, behind the thin servicer."""

from __future__ import annotations

from services.common.server import ServiceBinding
from services.rollout.core import RolloutCore
from services.rollout.engine import EngineConfig, make_engine
from services.rollout.registry_weights import RegistryWeights
from services.rollout.servicer import RolloutServicer
from services.rollout.settings import RolloutSettings
from services.rollout.weights import WeightSource
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name


def binding(settings: RolloutSettings, weights: WeightSource | None = None) -> ServiceBinding:
    """`weights` defaults to the registry at settings.registry_address, else this server."""
    config = EngineConfig(
        settings.device,
        settings.max_queue,
        settings.max_batch_prompts,
        settings.vllm_logprobs_mode,
        settings.vllm_tensor_parallel_size,
        settings.vllm_gpu_memory_utilization,
        settings.vllm_max_lora_rank,
    )
    engine = make_engine(settings.engine, config)
    holder: dict[str, RegistryWeights] = {}

    class _LateWeights:
        """The registry address is known only once the server has bound its port."""

        async def fetch(self, name: str, team: str):  # type: ignore[no-untyped-def]
            return await (weights or holder["registry"]).fetch(name, team)

        async def resolve(self, name: str, team: str) -> str:
            return await (weights or holder["registry"]).resolve(name, team)

    core = RolloutCore(engine, _LateWeights(), settings.max_n, settings.cache_bytes)
    servicer = RolloutServicer(core)

    async def on_start(address: str) -> None:
        if weights is None:
            cache = settings.cache_dir or settings.data_dir / "rollout-cache"
            holder["registry"] = RegistryWeights(
                settings.registry_address or address, settings.service_api_key, cache
            )
        if settings.model_revision:
            await core.load_model(settings.model_revision, settings.startup_team, "auto", 0)

    async def on_stop() -> None:
        await engine.close()
        if "registry" in holder:
            await holder["registry"].close()

    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(
            servicer, server
        ),
        on_start=on_start,
        on_stop=on_stop,
    )
