"""The services behind the gateway: a deployment from the deploy service, generation on the
serving pool (rollout), each through its one client, acting for the caller's team."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.clients.deploy import DeployClient
from services.clients.rollout import RolloutClient
from services.common.errors import InvalidArgument, NotFound
from services.common.proto_json import short_name
from services.gateway.calls import Call, Sampling
from services.gateway.errors import ApiError
from services.specs.names import DEPLOYMENT_PREFIX
from tlm.common.v1 import common_pb2
from tlm.deploy.v1 import deploy_pb2
from tlm.rollout.v1 import rollout_pb2


def deployment_name(model: str) -> str:
    """An OpenAI `model` names a deployment: 'chat' or 'deployments/chat'.

    >>> deployment_name("chat"), deployment_name("deployments/chat")
    ('deployments/chat', 'deployments/chat')
    """
    return model if model.startswith(DEPLOYMENT_PREFIX) else DEPLOYMENT_PREFIX + model


def sampling(
    s: Sampling, defaults: deploy_pb2.SamplingDefaults, logprobs: bool
) -> rollout_pb2.SamplingParams:
    """The request's parameters, else the deployment's defaults, else the engine's."""

    def pick(name: str) -> object:
        value = getattr(s, name)
        if value is None and defaults.HasField(name):  # type: ignore[arg-type]
            return getattr(defaults, name)
        return value

    return rollout_pb2.SamplingParams(
        n=s.n,
        temperature=pick("temperature"),  # type: ignore[arg-type]
        top_p=pick("top_p"),  # type: ignore[arg-type]
        max_tokens=pick("max_tokens"),  # type: ignore[arg-type]
        top_k=s.top_k if s.top_k is not None else defaults.top_k,
        stop=list(s.stop if s.stop is not None else defaults.stop),
        seed=s.seed,
        skip_logprobs=not logprobs,
    )


def generate_request(
    call: Call, d: deploy_pb2.Deployment, request_id: str
) -> rollout_pb2.GenerateRequest:
    if call.kind == "completion":
        prompts = [common_pb2.Prompt(text=t) for t in call.texts]
    else:
        turns = [common_pb2.ChatMessage(role=r, content=c) for r, c in call.messages]
        prompts = [common_pb2.Prompt(messages=common_pb2.Conversation(messages=turns))]
    return rollout_pb2.GenerateRequest(
        prompts=prompts,
        sampling=sampling(call.sampling, d.sampling_defaults, call.logprobs),
        model_revision=d.model_revision,
        adapter_revision=d.adapter_revision,
        return_prompt_token_ids=True,  # usage.prompt_tokens
        request_id=request_id,
    )


class Backend:
    def __init__(self, deploy: DeployClient, rollout: RolloutClient, timeout_s: float) -> None:
        self.deploy = deploy
        self.rollout = rollout
        self.timeout_s = timeout_s

    async def deployment(self, model: str, team: str) -> deploy_pb2.Deployment:
        """The deployment `model` names, serving; 404 if there is none, 503 if not ready."""
        try:
            d = await self.deploy.get_deployment(deployment_name(model), team)
        except (NotFound, InvalidArgument):
            raise ApiError(
                404, f"The model '{model}' does not exist", param="model", code="model_not_found"
            ) from None
        if not d.model_revision:
            state = short_name(deploy_pb2.Deployment.State, d.state)
            raise ApiError(
                503,
                f"The model '{model}' is not ready ({state}: {d.state_reason})",
                param="model",
                type="server_error",
                code="model_not_ready",
            )
        return d

    async def deployments(self, team: str) -> list[deploy_pb2.Deployment]:
        return await self.deploy.list_deployments(team)

    def generate(
        self, request: rollout_pb2.GenerateRequest, team: str
    ) -> AsyncIterator[rollout_pb2.GenerateResponse]:
        return self.rollout.generate(request, team, self.timeout_s)

    async def close(self) -> None:
        await self.deploy.close()
        await self.rollout.close()
