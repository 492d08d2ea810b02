"""The ports of `rl/ports.py` over the registry, rollout and reward clients (services/clients/):
the one place the online engine and EVALUATE convert protobuf to `rl/batch.py` types and back,
and decide what a remote error means (by its `ErrorInfo.reason`, not the status code alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from services.clients import rollout as rollout_client
from services.clients.artifacts import to_struct
from services.clients.registry import RegistryClient
from services.clients.reward import RewardClient
from services.common.client import call_metadata
from services.common.errors import TlmError
from services.trainer.convert import sampling_to_proto
from services.trainer.rl.batch import Row, Sample, Score, ScoreStatus
from services.trainer.rl.ports import PolicyLost, PolicyRef
from services.trainer.spec import Sampling
from tlm.common.v1 import common_pb2
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.rollout.v1 import rollout_pb2

PROMPTS_PER_CALL = 64  # prompts per Generate call
SAMPLES_PER_CALL = 256  # samples per Score call (the contract allows 4096)
STATUSES: dict[int, ScoreStatus] = {
    rs.SCORE_STATUS_OK: ScoreStatus.OK,
    rs.SCORE_STATUS_UNSCORABLE: ScoreStatus.UNSCORABLE,
    rs.SCORE_STATUS_TIMEOUT: ScoreStatus.TIMEOUT,
    rs.SCORE_STATUS_ERROR: ScoreStatus.ERROR,
    rs.SCORE_STATUS_PENDING: ScoreStatus.PENDING,
}
# What the rollout service answers when it does not serve the policy asked for: no model for
# the team (WRONG_STATE), an adapter on another base (MODEL_INCOMPATIBLE), an adapter not loaded
# (INVALID_FIELD on adapter_revision).
POLICY_LOST_REASONS = frozenset({"WRONG_STATE", "MODEL_INCOMPATIBLE"})


def policy_lost(error: TlmError) -> bool:
    """Whether a rollout error says it does not serve the policy asked for."""
    remote = error.remote
    if remote is None:
        return False
    return remote.reason in POLICY_LOST_REASONS or (
        remote.reason == "INVALID_FIELD" and "adapter_revision" in remote.fields
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
        revision = await self.registry.get_dataset_revision(self.name, self.team)
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


class RolloutClient(rollout_client.RolloutClient):
    """The rollout client, for the sampler and the publisher."""

    async def serve_model(self, revision: str, force: bool = False) -> str:
        """LoadModel unless `revision` is already served to this team (a reload would drop
        the adapters of other jobs of the team)."""
        status = await self.engine_status()
        if status.model_revision == revision and not force:
            return revision
        return (await self.load_model(revision)).policy_version


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
            except TlmError as exc:
                if policy_lost(exc):
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
            # Any replica serves it: full weights by name (a registry revision or a pushed
            # version), an adapter with its base (its lineage, or the base it was pushed for).
            model_revision="" if policy.adapter else policy.version,
            return_prompt_token_ids=True,
            request_id=request_id,
        )
        out: list[Sample | None] = [None] * (len(rows) * group)
        async for response in self.rollout.generate(request):
            for c in response.completions:
                out[c.prompt_index * group + c.sample_index] = Sample(
                    list(c.prompt_token_ids),
                    list(c.token_ids),
                    list(c.logprobs),
                    c.text,
                    c.policy_version,
                    truncated=c.finish_reason == rollout_pb2.FINISH_REASON_LENGTH,
                )
        missing = sum(1 for s in out if s is None)
        if missing:
            raise RuntimeError(f"rollout returned {len(out) - missing} of {len(out)} samples")
        return [s for s in out if s is not None]


class GrpcScorer:
    """`Score` on the reward service with one evaluator, SAMPLES_PER_CALL samples per call;
    `group_id` ties a prompt's samples together and the row's other columns ride along as
    metadata for the scorers."""

    def __init__(self, reward: RewardClient, evaluator: str) -> None:
        self.reward, self.evaluator = reward, evaluator

    async def close(self) -> None:
        await self.reward.close()

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
            response = await self.reward.score(request)
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
    scorers = {s.scorer: s.value for s in result.scorers if s.status == rs.SCORE_STATUS_OK}
    # Only an OK result carries a reward. An OK one without it is from a server older than
    # `optional reward`, which left a zero reward off the wire.
    has = result.HasField("reward") and math.isfinite(result.reward)
    reward = result.reward if status is ScoreStatus.OK and has else 0.0
    return Score(status, reward, scorers)


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
    rollout = RolloutClient(rollout_address, metadata=metadata)
    sampler = GrpcSampler(rollout, scaled_logprobs)
    reward = RewardClient(reward_address, metadata=metadata)
    return GrpcPorts(rollout, sampler, GrpcScorer(reward, evaluator))
