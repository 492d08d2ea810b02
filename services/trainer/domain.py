"""The trainer's domain: methods, job states, jobs, events and domain errors (no grpc).

Enum values equal the proto numbers of `tlm.trainer.v1`, so conversion is a lookup. What each
method needs and reads is its entry in the method table, `methods.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.common.errors import AlreadyExists, FailedPrecondition, FieldViolation, NotFound
from tlm.common.v1 import common_pb2


class Method(enum.IntEnum):
    SFT = 1
    DPO = 2
    KTO = 3
    REWARD_MODEL = 4
    GRPO = 5
    PPO = 6
    EVALUATE = 7


class DatasetKind(enum.IntEnum):
    """Mirrors tlm.registry.v1.DatasetKind; `name.lower()` is the registry's word for it."""

    SFT = 1
    PREFERENCE = 2
    UNPAIRED_PREFERENCE = 3
    PROMPT = 4


class JobState(enum.IntEnum):
    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLING = 5
    CANCELLED = 6

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# Allowed transitions; anything else is a bug in the caller.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset(
        {JobState.RUNNING, JobState.CANCELLING, JobState.CANCELLED, JobState.FAILED}
    ),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLING, JobState.PENDING}
    ),
    JobState.CANCELLING: frozenset({JobState.CANCELLED, JobState.FAILED, JobState.SUCCEEDED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class EventKind(enum.StrEnum):
    STATE = "state"
    METRICS = "metrics"
    CHECKPOINT = "checkpoint"
    RESULT = "result"
    LOG = "log"


@dataclass(frozen=True)
class Event:
    """One entry of a job's history; `data` holds the kind's fields (see EventKind)."""

    sequence: int
    time: datetime
    kind: EventKind
    data: dict[str, Any]


@dataclass(frozen=True)
class JobError:
    """A google.rpc.Status in domain form: a code name (grpc.StatusCode name) and a message."""

    code: str
    message: str


@dataclass(frozen=True)
class Progress:
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    job_id: str
    team: str
    spec: dict[str, Any]  # JobSpec.to_dict(): the spec with defaults filled in
    state: JobState
    device_plan: dict[str, Any]
    progress: Progress
    create_time: datetime
    display_name: str = ""
    request_id: str = ""
    request_digest: str = ""  # JobSpec.digest() of the request's spec ("" in older stores)
    labels: dict[str, str] = field(default_factory=dict)
    output_model_revision: str = ""
    final_metrics: dict[str, float] = field(default_factory=dict)
    error: JobError | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    checkpoint_step: int = 0
    cancel_requested: bool = False

    @property
    def name(self) -> str:
        return f"jobs/{self.job_id}"

    @property
    def method(self) -> Method:
        return Method(self.spec["method"])


class JobNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"{name} not found", metadata={"name": name})


class DatasetKindMismatch(FailedPrecondition):
    reason = common_pb2.DATASET_KIND_MISMATCH


class MethodNotImplemented(FailedPrecondition):
    reason = common_pb2.NOT_IMPLEMENTED


class ModelIncompatible(FailedPrecondition):
    reason = common_pb2.MODEL_INCOMPATIBLE


class RequestIdReused(AlreadyExists):
    """A create whose request_id names a job made from another spec (AIP-155: a retry must
    repeat the request; anything else is a new request and needs a new id)."""

    def __init__(self, request_id: str, job: str) -> None:
        message = f"request_id {request_id!r} was used for {job} with another spec"
        super().__init__(
            message,
            violations=[FieldViolation("request_id", message)],
            metadata={"request_id": request_id, "job": job},
        )
