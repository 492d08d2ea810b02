"""What the controller drives, as small protocols (verl's roles behind a single controller).

`grpc_ports` implements them over the registry, rollout and reward services; tests implement
them in memory. Everything crossing these is a domain type of `rl/batch.py` or plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.errors import FailedPrecondition
from services.trainer.rl.batch import Row, Sample, Score
from services.trainer.spec import Sampling


class PolicyLost(FailedPrecondition):
    """The sampler no longer serves the policy it should (another job of the team reloaded the
    base, an adapter was dropped): serve it again, once."""


@dataclass(frozen=True)
class PolicyRef:
    """A policy the sampler can serve: `version` is what its completions report, `adapter` the
    adapter revision to name when sampling ("" : the served model itself), `step` the trainer
    step whose weights it holds (0: the initial policy)."""

    version: str
    adapter: str = ""
    step: int = 0


class PromptSource(Protocol):
    """Rows of a prompt dataset."""

    async def open(self) -> int:
        """Prepare and return the number of rows."""
        ...

    async def batch(self, step: int, size: int) -> list[Row]:
        """Training batch `step` of `size` rows: a seeded shuffle, a new one each epoch."""
        ...

    async def read(self, limit: int = 0) -> list[Row]:
        """The rows in order, at most `limit` (0: all): what evaluation reads."""
        ...


class Sampler(Protocol):
    async def generate(
        self, rows: list[Row], sampling: Sampling, policy: PolicyRef, request_id: str
    ) -> list[Sample]:
        """`sampling.n` samples per row from `policy`, group by group (index p * n + k).
        Raises PolicyLost when the sampler does not serve `policy`."""
        ...


class Scorer(Protocol):
    async def score(
        self, rows: list[Row], samples: list[Sample], group_size: int, tag: str
    ) -> list[Score]:
        """One score per sample, in order; sample i answers rows[i // group_size]."""
        ...


class PolicyPublisher(Protocol):
    async def serve(self, policy: PolicyRef | None) -> PolicyRef:
        """Make the sampler serve `policy` (None: the initial one, the base); returns it."""
        ...

    async def publish(self, folder: Path, step: int) -> PolicyRef:
        """Store the exported weights in `folder` as the policy of `step` and serve it."""
        ...
