"""The deploy service's domain: deployments, their states, sampling defaults, what a change may
touch, and the domain errors (no grpc).

A deployment names a model (a revision or an alias) and an optional adapter; the service
resolves them to revision ids and *rolls*: the resolved revision is warmed on the serving pool
(`pending_*`) while the current one keeps serving, then it serves and the current one becomes the
rollback target (`previous_*`). Enum values equal the proto numbers of `tlm.deploy.v1`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from datetime import datetime

from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    field_error,
)
from services.specs.names import DEPLOYMENT_PREFIX, Collection, parse_revision
from services.specs.sampling import MAX_STOP, MAX_TEMPERATURE

MAX_REPLICAS = 64
MUTABLE = frozenset({"model", "adapter", "replicas", "sampling_defaults", "description"})


class DeploymentState(enum.IntEnum):
    PENDING = 1
    READY = 2
    FAILED = 3


@dataclass(frozen=True)
class SamplingDefaults:
    """What a gateway request that leaves a parameter out gets (None: the engine's default)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    top_k: int = 0
    stop: tuple[str, ...] = ()

    def check(self, prefix: str = "deployment.sampling_defaults") -> SamplingDefaults:
        t, p = self.temperature, self.top_p
        if t is not None and not (math.isfinite(t) and 0 <= t <= MAX_TEMPERATURE):
            raise field_error(f"{prefix}.temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        if p is not None and not (math.isfinite(p) and 0 < p <= 1):
            raise field_error(f"{prefix}.top_p", "must be in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise field_error(f"{prefix}.max_tokens", "must be >= 1")
        if self.top_k < 0:
            raise field_error(f"{prefix}.top_k", "must be >= 0 (0 disables)")
        if len(self.stop) > MAX_STOP or any(not s for s in self.stop):
            raise field_error(f"{prefix}.stop", f"at most {MAX_STOP} non-empty strings")
        return self


@dataclass(frozen=True)
class Spec:
    """What the user chose: the part of a deployment that Create and Update set."""

    model: str
    adapter: str = ""
    replicas: int = 1
    sampling: SamplingDefaults = SamplingDefaults()
    description: str = ""

    def check(self) -> Spec:
        """Names and bounds, before anything is resolved."""
        if not self.model:
            raise field_error("deployment.model", "is required, e.g. models/NAME/revisions/prod")
        parse_revision(self.model, Collection.MODELS, "deployment.model")
        if self.adapter:
            parse_revision(self.adapter, Collection.MODELS, "deployment.adapter")
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise field_error("deployment.replicas", f"must be in 1..{MAX_REPLICAS}")
        self.sampling.check()
        return self


@dataclass(frozen=True)
class Resolved:
    """Revision ids (never aliases) of a model and its optional adapter."""

    model: str
    adapter: str = ""


@dataclass(frozen=True)
class Deployment:
    deployment_id: str
    team: str
    spec: Spec
    state: DeploymentState = DeploymentState.PENDING
    state_reason: str = ""
    current: Resolved | None = None  # serves now
    pending: Resolved | None = None  # being warmed (or failed to)
    previous: Resolved | None = None  # the rollback target
    generation: int = 1  # bumped by every write; the etag and the guard of concurrent rolls
    request_id: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def name(self) -> str:
        return DEPLOYMENT_PREFIX + self.deployment_id

    @property
    def etag(self) -> str:
        return f'W/"{self.generation}"'

    def rolling_to(self, target: Resolved) -> Deployment:
        """PENDING on `target`; the current revision keeps serving meanwhile."""
        return replace(
            self,
            state=DeploymentState.PENDING,
            state_reason=f"warming {target.model} on the serving pool",
            pending=target,
        )

    def rolled(self) -> Deployment:
        """The pending revision serves; the one it replaces becomes the rollback target."""
        assert self.pending is not None
        previous = self.current if self.current not in (None, self.pending) else self.previous
        return replace(
            self,
            state=DeploymentState.READY,
            state_reason="",
            current=self.pending,
            pending=None,
            previous=previous,
        )

    def failed(self, reason: str) -> Deployment:
        return replace(self, state=DeploymentState.FAILED, state_reason=reason)

    def target(self) -> Resolved | None:
        """What the deployment is, or is becoming: the pending revision, else the current."""
        return self.pending or self.current


@dataclass
class Page:
    deployments: list[Deployment] = field(default_factory=list)
    next_token: str = ""


class DeploymentNotFound(NotFound):
    pass


class NoRollbackTarget(FailedPrecondition):
    pass


class NotReady(FailedPrecondition):
    """The deployment has no revision that serves yet (PENDING on its first, or FAILED)."""


def check_mask(paths: list[str]) -> list[str]:
    """The update mask's paths, each one a field Update may change."""
    if not paths:
        raise field_error("update_mask", f"is required: name any of {', '.join(sorted(MUTABLE))}")
    bad = [p for p in paths if p not in MUTABLE]
    if bad:
        violations = [
            FieldViolation(
                "update_mask", f"{p!r} cannot be updated; updatable: {', '.join(sorted(MUTABLE))}"
            )
            for p in bad
        ]
        raise InvalidArgument(f"update_mask: {violations[0].description}", violations=violations)
    return paths
