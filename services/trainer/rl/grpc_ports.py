"""The ports of `rl/ports.py` over the registry, rollout and reward services: the one place the
online engine and EVALUATE call those stubs, convert protobuf to `rl/batch.py` types and back,
and classify remote errors (by `ErrorInfo.reason`, not the status code alone).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.client import aio_channel, call_metadata
from services.registry.client import RegistryClient, to_struct
from services.trainer.convert import sampling_to_proto
from services.trainer.rl.batch import Row, Sample, Score, ScoreStatus
from services.trainer.rl.ports import PolicyLost, PolicyRef
from services.trainer.spec import Sampling
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

PROMPTS_PER_CALL = 64  # prompts per Generate call
SAMPLES_PER_CALL = 256  # samples per Score call (the contract allows 4096)
STATUSES: dict[int, ScoreStatus] = {
    rs.OK: ScoreStatus.OK,
    rs.UNSCORABLE: ScoreStatus.UNSCORABLE,
    rs.TIMEOUT: ScoreStatus.TIMEOUT,
    rs.ERROR: ScoreStatus.ERROR,
    rs.PENDING: ScoreStatus.PENDING,
}
# What the rollout service answers when it does not serve the policy asked for: no model for
# the team (WRONG_STATE), an adapter on another base (MODEL_INCOMPATIBLE), an adapter not loaded
# (INVALID_FIELD on adapter_revision).
POLICY_LOST_REASONS = frozenset({"WRONG_STATE", "MODEL_INCOMPATIBLE"})
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RemoteError:
    """A service's error as it sent it: status code, `ErrorInfo.reason`, violated fields."""

    code: grpc.StatusCode
    reason: str
    fields: tuple[str, ...]


def remote_error(exc: grpc.aio.AioRpcError) -> RemoteError:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    reason, fields = "", ()
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = tuple(v.field for v in bad.field_violations)
    return RemoteError(exc.code(), reason, fields)


def policy_lost(error: RemoteError) -> bool:
    return error.reason in POLICY_LOST_REASONS or (
        error.reason == "INVALID_FIELD" and "adapter_revision" in error.fields
    )


def prompt_to_proto(prompt: Any) -> common_pb2.Prompt:
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]
    return common_pb2.Prompt(messages=common_pb2.Conversation(messages=messages))


class GrpcPromptSource:
    """A registry prompt dataset. Batch `step` is B rows of a seeded shuffle, a new shuffle per
    epoch (seed + epoch); a batch that crosses an epoch's end takes the rest from the next one."""

    def __init__(self, registry: RegistryClient, team: str, name: str, seed: int) -> None:
        self.registry, self.team, self.name, self.seed = registry, team, name, seed
        self.row_count = 0

    async def open(self) -> int:
        request = registry_pb2.GetDatasetRevisionRequest(name=self.name)
        revision = await self.registry.stub.GetDatasetRevision(
            request, metadata=self.registry.metadata(self.team)
        )
        self.row_count = int(revision.row_count)
        return self.row_count

    async def batch(self, step: int, size: int) -> list[Row]:
        rows: list[Row] = []
        start = step * size
        while len(rows) < size:
            epoch, offset = divmod(start + len(rows), self.row_count)
            take = min(size - len(rows), self.row_count - offset)
            rows += [
                row
                async for row in self.registry.read_dataset_rows(
                    self.name,
                    self.team,
                    shuffle=True,
                    shuffle_seed=self.seed + epoch,
                    offset=offset,
                    limit=take,
                )
            ]
        return rows

    async def read(self, limit: int = 0) -> list[Row]:
        options: dict[str, Any] = {"limit": limit} if limit else {}
        return [r async for r in self.registry.read_dataset_rows(self.name, self.team, **options)]


class RolloutClient:
    """The rollout service's stub, for the sampler and the publisher."""

    def __init__(self, address: str, metadata: Metadata) -> None:
        self._channel = aio_channel(address)
        self.stub = rollout_pb2_grpc.RolloutServiceStub(self._channel)
        self.metadata = metadata

    async def close(self) -> None:
        await self._channel.close(None)

    async def serve_model(self, revision: str, force: bool = False) -> str:
        """LoadModel unless `revision` is already served to this team (a reload would drop
        the adapters of other jobs of the team)."""
        status = await self.stub.GetEngineStatus(
            rollout_pb2.GetEngineStatusRequest(), metadata=self.metadata
        )
        if status.model_revision == revision and not force:
            return revision
        request = rollout_pb2.LoadModelRequest(model_revision=revision)
        return (await self.stub.LoadModel(request, metadata=self.metadata)).policy_version

    async def load_adapter(self, revision: str) -> str:
        request = rollout_pb2.LoadAdapterRequest(adapter_revision=revision)
        return (await self.stub.LoadAdapter(request, metadata=self.metadata)).policy_version


class GrpcSampler:
    """`Generate` on the rollout service, PROMPTS_PER_CALL prompts per call. With
    `scaled_logprobs` the samples' log-probs are log_softmax(logits / temperature), what the
    actor computes, so the importance-sampling correction compares like with like; else raw."""

    def __init__(self, rollout: RolloutClient, scaled_logprobs: bool = False) -> None:
        self.rollout = rollout
        self.logprobs_mode = (
            rollout_pb2.LOGPROBS_MODE_TEMPERATURE_SCALED
            if scaled_logprobs
            else rollout_pb2.LOGPROBS_MODE_RAW
        )

    async def generate(
        self, rows: list[Row], sampling: Sampling, policy: PolicyRef, request_id: str
    ) -> list[Sample]:
        proto = sampling_to_proto(sampling.__dict__)
        proto.logprobs_mode = self.logprobs_mode
        out: list[Sample] = []
        for start in range(0, len(rows), PROMPTS_PER_CALL):
            chunk = rows[start : start + PROMPTS_PER_CALL]
            suffix = f"-{start}" if start else ""
            try:
                out += await self._call(chunk, proto, policy, request_id + suffix)
            except grpc.aio.AioRpcError as exc:
                if policy_lost(remote_error(exc)):
                    raise PolicyLost(f"the rollout service lost {policy.version}") from exc
                raise
        return out

    async def _call(
        self,
        rows: list[Row],
        sampling: rollout_pb2.SamplingParams,
        policy: PolicyRef,
        request_id: str,
    ) -> list[Sample]:
        group = sampling.n or 1
        request = rollout_pb2.GenerateRequest(
            prompts=[prompt_to_proto(r["prompt"]) for r in rows],
            sampling=sampling,
            adapter_revision=policy.adapter,
            return_prompt_token_ids=True,
            request_id=request_id,
        )
        out: list[Sample | None] = [None] * (len(rows) * group)
        meta = self.rollout.metadata
        async for response in self.rollout.stub.Generate(request, metadata=meta):
            for c in response.completions:
                out[c.prompt_index * group + c.sample_index] = Sample(
                    list(c.prompt_token_ids),
                    list(c.token_ids),
                    list(c.logprobs),
                    c.text,
                    c.policy_version,
                    truncated=c.finish_reason == rollout_pb2.LENGTH,
                )
        missing = sum(1 for s in out if s is None)
        if missing:
            raise RuntimeError(f"rollout returned {len(out) - missing} of {len(out)} samples")
        return [s for s in out if s is not None]


class GrpcScorer:
    """`Score` on the reward service with one evaluator, SAMPLES_PER_CALL samples per call;
    `group_id` ties a prompt's samples together and the row's other columns ride along as
    metadata for the scorers."""

    def __init__(self, address: str, metadata: Metadata, evaluator: str) -> None:
        self._channel = aio_channel(address)
        self.stub = rs_grpc.RewardServiceStub(self._channel)
        self.metadata, self.evaluator = metadata, evaluator

    async def close(self) -> None:
        await self._channel.close(None)

    async def score(
        self, rows: list[Row], samples: list[Sample], group_size: int, tag: str
    ) -> list[Score]:
        protos = [
            self._sample(rows[i // group_size], s, i, group_size, tag)
            for i, s in enumerate(samples)
        ]
        scores: list[Score] = []
        for start in range(0, len(protos), SAMPLES_PER_CALL):
            request = rs.ScoreRequest(
                evaluator=self.evaluator, samples=protos[start : start + SAMPLES_PER_CALL]
            )
            response = await self.stub.Score(request, metadata=self.metadata)
            scores += [_score(r) for r in response.results]
        return scores

    @staticmethod
    def _sample(row: Row, sample: Sample, i: int, group_size: int, tag: str) -> rs.Sample:
        return rs.Sample(
            sample_id=f"{tag}-{i}",
            prompt=prompt_to_proto(row["prompt"]),
            completion=sample.text,
            metadata=to_struct({k: v for k, v in row.items() if k != "prompt"}),
            group_id=f"{tag}-{i // group_size}",
            completion_token_ids=sample.completion_ids,
        )


def _score(result: rs.SampleResult) -> Score:
    status = STATUSES.get(result.status, ScoreStatus.ERROR)
    scorers = {s.scorer: s.value for s in result.scorers if s.status == rs.OK}
    # Only an OK result carries a reward. An OK one without it is from a server older than
    # `optional reward`, which left a zero reward off the wire.
    has = result.HasField("reward") and math.isfinite(result.reward)
    reward = result.reward if status is ScoreStatus.OK and has else 0.0
    return Score(status, reward, scorers)


class GrpcPublisher:
    """Policies go to the registry (a revision of the output model, by `upload`) and the rollout
    service loads them: a LoRA adapter by LoadAdapter, full weights by LoadModel."""

    def __init__(
        self,
        rollout: RolloutClient,
        upload: Callable[[Path, str], Awaitable[str]],
        base_model: str,
        lora: bool,
        job_id: str,
    ) -> None:
        self.rollout, self.upload = rollout, upload
        self.base_model, self.lora, self.job_id = base_model, lora, job_id

    async def serve(self, policy: PolicyRef | None) -> PolicyRef:
        if policy is None or not policy.step:
            await self.rollout.serve_model(self.base_model)
            return PolicyRef(self.base_model)
        if self.lora:
            await self.rollout.serve_model(self.base_model)
            await self.rollout.load_adapter(policy.version)
        else:
            await self.rollout.serve_model(policy.version)
        return policy

    async def publish(self, folder: Path, step: int) -> PolicyRef:
        revision = await self.upload(folder, f"{self.job_id}-step-{step}")
        if self.lora:
            await self.rollout.load_adapter(revision)
            return PolicyRef(revision, adapter=revision, step=step)
        await self.rollout.serve_model(revision, force=True)
        return PolicyRef(revision, step=step)


@dataclass
class GrpcPorts:
    """The ports of one job over its services, and the channels to close."""

    rollout: RolloutClient
    sampler: GrpcSampler
    scorer: GrpcScorer

    async def close(self) -> None:
        await self.rollout.close()
        await self.scorer.close()


def open_ports(
    rollout_address: str,
    reward_address: str,
    evaluator: str,
    api_key: str | None,
    team: str,
    scaled_logprobs: bool = False,
) -> GrpcPorts:
    metadata = call_metadata(api_key, team)
    rollout = RolloutClient(rollout_address, metadata)
    sampler = GrpcSampler(rollout, scaled_logprobs)
    return GrpcPorts(rollout, sampler, GrpcScorer(reward_address, metadata, evaluator))
