"""The roles the online-RL controller drives, behind small interfaces: prompt batches from the
registry, the rollout service (generate, push weights) and the reward service (score)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.client import aio_channel
from services.registry.client import RegistryClient, to_struct
from services.trainer.evaluate import prompt_to_proto
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

Metadata = tuple[tuple[str, str], ...]


class PromptBatches:
    """Batch `step` of a prompt dataset: B rows of a seeded shuffle, a new shuffle per epoch
    (seed + epoch); a batch that crosses an epoch's end takes the rest from the next one."""

    def __init__(
        self, registry: RegistryClient, team: str, name: str, size: int, seed: int
    ) -> None:
        self.registry, self.team, self.name = registry, team, name
        self.size, self.seed = size, seed
        self.row_count = 0

    async def open(self) -> int:
        request = registry_pb2.GetDatasetRevisionRequest(name=self.name)
        revision = await self.registry.stub.GetDatasetRevision(
            request, metadata=self.registry.metadata(self.team)
        )
        self.row_count = int(revision.row_count)
        return self.row_count

    def total_steps(self, max_steps: int, epochs: float) -> int:
        return max_steps or max(1, math.ceil(epochs * self.row_count / self.size))

    async def batch(self, step: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        start = step * self.size
        while len(rows) < self.size:
            epoch, offset = divmod(start + len(rows), self.row_count)
            take = min(self.size - len(rows), self.row_count - offset)
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


@dataclass(frozen=True)
class Rollout:
    """One sample: prompt and completion token ids, the behaviour policy's raw log-probs."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    policy_version: str


class RolloutRole:
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

    async def generate(
        self,
        rows: list[dict[str, Any]],
        sampling: rollout_pb2.SamplingParams,
        adapter: str,
        request_id: str,
    ) -> list[Rollout]:
        """G = sampling.n samples per row, ordered group by group (index p * G + k)."""
        group = sampling.n
        request = rollout_pb2.GenerateRequest(
            prompts=[prompt_to_proto(r["prompt"]) for r in rows],
            sampling=sampling,
            adapter_revision=adapter,
            return_prompt_token_ids=True,
            request_id=request_id,
        )
        out: list[Rollout | None] = [None] * (len(rows) * group)
        async for response in self.stub.Generate(request, metadata=self.metadata):
            for c in response.completions:
                out[c.prompt_index * group + c.sample_index] = Rollout(
                    list(c.prompt_token_ids),
                    list(c.token_ids),
                    list(c.logprobs),
                    c.text,
                    c.policy_version,
                )
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:
            raise RuntimeError(f"rollout returned {len(out) - len(missing)} of {len(out)} samples")
        return [r for r in out if r is not None]


class RewardRole:
    def __init__(self, address: str, metadata: Metadata, evaluator: str) -> None:
        self._channel = aio_channel(address)
        self.stub = rs_grpc.RewardServiceStub(self._channel)
        self.metadata, self.evaluator = metadata, evaluator

    async def close(self) -> None:
        await self._channel.close(None)

    async def score(
        self, rows: list[dict[str, Any]], rollouts: list[Rollout], tag: str
    ) -> list[tuple[int, float]]:
        """(status, reward) per rollout, in order; group_id ties a prompt's samples together
        and the row's other columns ride along as metadata for the scorers."""
        group = len(rollouts) // len(rows)
        samples = []
        for i, r in enumerate(rollouts):
            row = rows[i // group]
            samples.append(
                rs.Sample(
                    sample_id=f"{tag}-{i}",
                    prompt=prompt_to_proto(row["prompt"]),
                    completion=r.text,
                    metadata=to_struct({k: v for k, v in row.items() if k != "prompt"}),
                    group_id=f"{tag}-{i // group}",
                    completion_token_ids=r.completion_ids,
                )
            )
        request = rs.ScoreRequest(evaluator=self.evaluator, samples=samples)
        response = await self.stub.Score(request, metadata=self.metadata)
        return [(result.status, result.reward) for result in response.results]


def adapter_missing(exc: grpc.aio.AioRpcError) -> bool:
    """The rollout service lost our adapter (another LoadModel of the team replaced the base)."""
    return exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
