"""Wiring of the reward service: its servicer mounted on the shared server bootstrap."""

from __future__ import annotations

from services.common.errors import FieldViolation
from services.common.server import ServiceBinding
from services.reward.admission import Admission
from services.reward.cache import OutcomeCache
from services.reward.engine import AsyncScorer, Engine
from services.reward.judge import JudgeScorerAdapter
from services.reward.model_scorer import ModelScorerAdapter
from services.reward.registry_port import RegistryPort
from services.reward.remote import RemoteScorerAdapter, probe_address
from services.reward.review_queue import ReviewQueue
from services.reward.review_store import ReviewStore
from services.reward.rule_runner import RuleRunner
from services.reward.sandbox import CodeScorerAdapter, Limits, Sandbox
from services.reward.sandbox_memory import choose_policy
from services.reward.service import RewardCore
from services.reward.servicer import RewardServicer
from services.reward.settings import RewardSettings
from services.specs.evaluator import MAX_CODE_TIMEOUT_S
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2, reward_service_pb2_grpc


def deployment_problems(
    spec: ev.EvaluatorSpec, remote: RemoteScorerAdapter, judge: JudgeScorerAdapter
) -> list[FieldViolation]:
    """What this deployment's operator does not allow: credentials and addresses."""
    problems = []
    for i, scorer in enumerate(spec.scorers):
        if scorer.HasField("remote") and (why := remote.problem(scorer.remote)):
            problems.append(FieldViolation(f"scorers[{i}].remote.api_key_env", why))
        if scorer.HasField("judge") and (why := judge.problem(scorer.judge)):
            problems.append(FieldViolation(f"scorers[{i}].judge.rollout_address", why))
    return problems


SERVICE_NAME = reward_service_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


def binding(settings: RewardSettings) -> ServiceBinding:
    rules = RuleRunner(settings.rule_workers)
    caps = Limits(
        wall_s=MAX_CODE_TIMEOUT_S,
        cpu_seconds=settings.sandbox_max_cpu_seconds,
        memory_mb=settings.sandbox_max_memory_mb,
        max_processes=settings.sandbox_max_processes,
        max_file_mb=settings.sandbox_max_file_mb,
    )
    memory = choose_policy(settings.sandbox_memory_mode, settings.sandbox_cgroup)
    sandbox = Sandbox(settings.sandbox_slots, settings.sandbox_uid_base, caps, memory)
    remote = RemoteScorerAdapter(settings.remote_keys)
    models = ModelScorerAdapter(settings.device, settings.loaded_models)
    judge = JudgeScorerAdapter(
        settings.service_api_key, allowed_addresses=settings.judge_rollout_addresses
    )
    (settings.data_dir / "reward").mkdir(parents=True, exist_ok=True)
    sqlite = f"sqlite:///{settings.data_dir / 'reward' / 'reviews.db'}"
    store = ReviewStore(settings.database_url or sqlite)
    reviews = ReviewQueue(store)
    adapters: dict[str, AsyncScorer] = {
        "code": CodeScorerAdapter(sandbox, settings.sandbox_max_source_kb),
        "remote": remote,
        "model": models,
        "human": reviews,
        "judge": judge,
    }
    engine = Engine(rules, OutcomeCache(settings.cache_entries), adapters)
    core = RewardCore(
        engine,
        Admission(settings.max_concurrent_requests, settings.stream_idle_timeout_s),
        settings.max_samples_per_request,
        probe=probe_address,
        model_check=models.problem,
        policy=lambda spec: deployment_problems(spec, remote, judge),
    )
    servicer = RewardServicer(core, reviews)

    async def on_start(address: str) -> None:
        # Unset addresses mean the server's own (`tlm up` runs every service in one process).
        registry_address = settings.registry_address or address
        cache_root = settings.data_dir / "reward" / "models"
        core.registry = RegistryPort(registry_address, settings.service_api_key, cache_root)
        models.registry = reviews.registry = core.registry
        judge.default_address = settings.rollout_address or address
        await rules.warm_up()

    async def on_stop() -> None:
        rules.close()
        await remote.close()
        await judge.close()
        store.close()
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
