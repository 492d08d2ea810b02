"""Domain types of the reward service: samples, statuses, results and errors (no grpc here)."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import FailedPrecondition
from tlm.common.v1 import common_pb2


class Status(enum.IntEnum):
    """A scorer's or a sample's outcome. Values mirror tlm.reward.v1.ScoreStatus."""

    OK = 1
    UNSCORABLE = 2
    TIMEOUT = 3
    ERROR = 4
    PENDING = 5


# Which status a sample takes when several scorers fail: the worst one wins.
SEVERITY: Mapping[Status, int] = {
    Status.OK: 0,
    Status.PENDING: 1,
    Status.UNSCORABLE: 2,
    Status.TIMEOUT: 3,
    Status.ERROR: 4,
}


@dataclass(frozen=True)
class Prompt:
    """Text, or chat messages as (role, content) pairs."""

    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()

    def as_text(self) -> str:
        """The prompt as one string (chat turns joined as 'role: content' lines)."""
        if self.messages:
            return "\n".join(f"{role}: {content}" for role, content in self.messages)
        return self.text


@dataclass(frozen=True)
class Sample:
    sample_id: str
    completion: str
    prompt: Prompt = Prompt()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    group_id: str = ""
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What one scorer says about one sample, before normalisation."""

    status: Status
    raw: float = 0.0
    reason: str = ""
    review: str = ""

    @staticmethod
    def ok(raw: float) -> Outcome:
        return Outcome(Status.OK, float(raw))

    @staticmethod
    def unscorable(reason: str) -> Outcome:
        return Outcome(Status.UNSCORABLE, 0.0, reason)

    @staticmethod
    def error(reason: str) -> Outcome:
        return Outcome(Status.ERROR, 0.0, reason)

    @staticmethod
    def timeout(reason: str) -> Outcome:
        return Outcome(Status.TIMEOUT, 0.0, reason)


@dataclass(frozen=True)
class ScorerResult:
    scorer: str
    status: Status
    raw_value: float = 0.0
    value: float = 0.0
    reason: str = ""
    cached: bool = False
    latency_s: float = 0.0
    review: str = ""


@dataclass(frozen=True)
class SampleResult:
    sample_id: str
    status: Status
    reward: float | None
    scorers: Sequence[ScorerResult]
    gate: str = ""
    reason: str = ""


class ModelIncompatible(FailedPrecondition):
    """A model revision cannot serve as a reward model (not a sequence classifier)."""

    reason = common_pb2.MODEL_INCOMPATIBLE
