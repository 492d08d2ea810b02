"""Wiring of the reward service: its servicer mounted on the shared server bootstrap."""

from __future__ import annotations

from services.common.server import ServiceBinding
from services.reward.admission import Admission
from services.reward.cache import OutcomeCache
from services.reward.engine import AsyncScorer, Engine
from services.reward.registry_port import RegistryPort
from services.reward.remote import RemoteScorerAdapter, probe_address
from services.reward.rule_runner import RuleRunner
from services.reward.sandbox import CodeScorerAdapter, Sandbox
from services.reward.service import RewardCore
from services.reward.servicer import RewardServicer
from services.reward.settings import RewardSettings
from tlm.reward.v1 import reward_service_pb2, reward_service_pb2_grpc

SERVICE_NAME = reward_service_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


def binding(settings: RewardSettings) -> ServiceBinding:
    rules = RuleRunner(settings.rule_workers)
    sandbox = Sandbox(settings.sandbox_slots, settings.sandbox_uid_base)
    remote = RemoteScorerAdapter(settings.service_api_key)
    adapters: dict[str, AsyncScorer] = {"code": CodeScorerAdapter(sandbox), "remote": remote}
    engine = Engine(rules, OutcomeCache(settings.cache_entries), adapters)
    core = RewardCore(
        engine,
        Admission(settings.max_concurrent_requests),
        settings.max_samples_per_request,
        probe=probe_address,
    )
    servicer = RewardServicer(core)  # type: ignore[abstract]  # reviews: not yet

    async def on_start(address: str) -> None:
        registry_address = settings.registry_address or address
        cache_root = settings.data_dir / "reward" / "models"
        core.registry = RegistryPort(registry_address, settings.service_api_key, cache_root)
        await rules.warm_up()

    async def on_stop() -> None:
        rules.close()
        await remote.close()
        if core.registry is not None:
            await core.registry.close()

    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: reward_service_pb2_grpc.add_RewardServiceServicer_to_server(
            servicer, server
        ),
        on_start=on_start,
        on_stop=on_stop,
    )
