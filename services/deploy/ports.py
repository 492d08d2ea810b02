"""What the deploy core calls outside itself: the registry (resolve a model and adapter to
revision ids, check that they fit) and the serving pool of rollout replicas (warm a revision).
Both go through the one client of their service (services/clients/)."""

from __future__ import annotations

from services.clients.errors import in_context
from services.clients.registry import RegistryClient
from services.clients.rollout import RolloutClient
from services.common.errors import FailedPrecondition, FieldViolation, NotFound, field_error
from services.deploy.domain import Resolved, Spec
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2
from tlm.rollout.v1 import rollout_pb2


class RegistryResolver:
    """Model (and adapter) names, aliases included, to the revision ids they mean now."""

    def __init__(self, client: RegistryClient) -> None:
        self.client = client

    async def _revision(self, name: str, team: str, field: str) -> registry_pb2.ModelRevision:
        try:
            return await self.client.get_model_revision(name, team)
        except NotFound as exc:
            raise in_context(exc, field, field) from exc

    async def resolve(self, spec: Spec, team: str) -> Resolved:
        model = await self._revision(spec.model, team, "deployment.model")
        if model.format != registry_pb2.MODEL_FORMAT_FULL_WEIGHTS:
            raise field_error("deployment.model", "is a LoRA adapter; name it in adapter")
        if not spec.adapter:
            return Resolved(model.name)
        adapter = await self._revision(spec.adapter, team, "deployment.adapter")
        if adapter.format != registry_pb2.MODEL_FORMAT_LORA_ADAPTER:
            raise field_error("deployment.adapter", "is not a LoRA adapter")
        base = adapter.lineage.base_model_revision
        if base != model.name:
            description = f"{adapter.name} is an adapter of {base or 'no base'}, not {model.name}"
            raise FailedPrecondition(
                f"deployment.adapter: {description}",
                violations=[FieldViolation("deployment.adapter", description)],
                reason=common_pb2.MODEL_INCOMPATIBLE,
            )
        return Resolved(model.name, adapter.name)

    async def close(self) -> None:
        await self.client.close()


class ServingPool:
    """The rollout replicas that serve deployments (TLM_DEPLOY_ROLLOUT_ADDRESS), apart from the
    ones that serve training rollouts."""

    def __init__(self, client: RolloutClient, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s

    async def warm(self, target: Resolved, replicas: int, team: str) -> None:
        """LoadModel `replicas` times (the channel balances them round robin over the pool's
        replicas); with an adapter, a one-token Generate naming both loads it there too."""
        for _ in range(replicas):
            await self.client.load_model(target.model, team, self.timeout_s)
            if target.adapter:
                request = rollout_pb2.GenerateRequest(
                    prompts=[common_pb2.Prompt(text="warm-up")],
                    sampling=rollout_pb2.SamplingParams(max_tokens=1, skip_logprobs=True),
                    model_revision=target.model,
                    adapter_revision=target.adapter,
                    request_id="deploy-warm-up",
                )
                await self.client.generate_all(request, team, self.timeout_s)

    async def close(self) -> None:
        await self.client.close()
