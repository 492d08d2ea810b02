"""The reward service's use cases: resolve an evaluator, score, validate. No gRPC here; the
servicer converts messages and calls these.

Spec validation is CPU-bound (JSON Schema checks take up to ~0.4 s per schema within the size
limits), so it runs in a worker thread: the event loop keeps answering health checks and other
calls meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument
from services.reward.admission import Admission, StreamClaim, idle_error
from services.reward.domain import Sample, SampleResult
from services.reward.engine import MAX_REQUEST_S, Engine, ScoreContext, scoring_time
from services.reward.registry_port import RegistryPort
from services.specs.evaluator import (
    EvaluatorInvalid,
    Validation,
    require_valid,
    validate_json,
    validate_spec,
)
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward")

# Probes an address (remote scorers) and returns why it does not answer, or None.
AddressProbe = Callable[[str, bool], Awaitable[str | None]]
# Why a model revision cannot serve as a reward model for a team (missing, wrong kind), or None.
ModelCheck = Callable[[str, str], Awaitable[str | None]]
# What the deployment refuses in a valid spec (credentials, addresses), as JSON-path errors.
Policy = Callable[[ev.EvaluatorSpec], list[FieldViolation]]
T = TypeVar("T")
VALID_SPECS = 64  # validated specs remembered by RewardCore._valid


@dataclass
class RewardCore:
    engine: Engine
    admission: Admission
    max_samples: int
    registry: RegistryPort | None = None
    probe: AddressProbe | None = None
    model_check: ModelCheck | None = None
    policy: Policy | None = None
    # Serialized spec -> its normalised form, for specs validated before (least recent first).
    _normalized: OrderedDict[bytes, bytes] = field(
        default_factory=OrderedDict, init=False, repr=False
    )

    def _allowed(self, spec: ev.EvaluatorSpec) -> ev.EvaluatorSpec:
        problems = self.policy(spec) if self.policy is not None else []
        if problems:
            raise EvaluatorInvalid(problems)
        return spec

    async def resolve(
        self, name: str | None, inline: ev.EvaluatorSpec | None, team: str
    ) -> tuple[ev.EvaluatorSpec, str]:
        """The runnable spec (validated, defaults filled) and the registry revision name."""
        if inline is not None:
            return self._allowed(await self._valid(inline)), ""
        if not name:
            raise InvalidArgument("set evaluator (a registry revision name) or spec")
        if self.registry is None:
            raise FailedPrecondition("no registry configured for the reward service")
        spec, revision = await self.registry.evaluator_spec(name, team)
        return self._allowed(await self._valid(spec)), revision

    async def _valid(self, spec: ev.EvaluatorSpec) -> ev.EvaluatorSpec:
        """`require_valid`, in a thread the first time; a spec seen before is answered here (a
        thread hand-off per call costs more than scoring a small batch)."""
        key = spec.SerializeToString(deterministic=True)
        known = self._normalized.get(key)
        if known is not None:
            self._normalized.move_to_end(key)
            return ev.EvaluatorSpec.FromString(known)  # a fresh copy: callers may change it
        valid = await asyncio.to_thread(require_valid, spec)
        self._normalized[key] = valid.SerializeToString()
        if len(self._normalized) > VALID_SPECS:
            self._normalized.popitem(last=False)
        return valid

    async def stream_opening(self, first: Awaitable[T]) -> T:
        """A stream's first message; a stream that sends none is closed like an idle one."""
        try:
            return await asyncio.wait_for(first, self.admission.idle_s)
        except TimeoutError:
            raise idle_error(self.admission.idle_s) from None

    def check_batch(self, samples: Sequence[Sample]) -> None:
        if len(samples) > self.max_samples:
            raise InvalidArgument(
                f"samples: at most {self.max_samples} per request, got {len(samples)}",
                violations=[FieldViolation("samples", f"at most {self.max_samples}")],
            )
        seen: set[str] = set()
        for i, s in enumerate(samples):
            if s.sample_id and s.sample_id in seen:
                raise InvalidArgument(
                    f"samples[{i}].sample_id: duplicate {s.sample_id!r}",
                    violations=[FieldViolation(f"samples[{i}].sample_id", "duplicate")],
                )
            seen.add(s.sample_id)

    async def score(
        self, spec: ev.EvaluatorSpec, samples: Sequence[Sample], team: str, remaining: float | None
    ) -> list[SampleResult]:
        self.check_batch(samples)
        with self.admission.slot(team):
            return await self.engine.score(spec, samples, _context(team, remaining))

    async def score_stream(
        self,
        spec: ev.EvaluatorSpec,
        samples: AsyncIterator[Sample],
        team: str,
        remaining: float | None,
    ) -> AsyncIterator[SampleResult]:
        """Scores each sample as it arrives; yields results as they finish. The stream holds an
        admission slot only while samples are being scored, and ends when idle (StreamClaim)."""
        ctx = _context(team, remaining)
        done: asyncio.Queue[object] = asyncio.Queue()
        claim = StreamClaim(self.admission, team, on_idle=done.put_nowait)
        tasks: set[asyncio.Task[None]] = set()
        total: list[int] = []
        # Samples scored or waiting to be read back; a slow reader stops the intake.
        in_flight = asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def one(sample: Sample) -> None:
            try:
                (result,) = await self.engine.score(spec, [sample], ctx)
                await done.put(result)
            except Exception as exc:
                await done.put(exc)
            finally:
                claim.sample_done()

        async def read() -> None:
            count = 0
            try:
                async for sample in samples:
                    count += 1
                    if count > self.max_samples:
                        raise InvalidArgument(f"at most {self.max_samples} samples per stream")
                    await in_flight.acquire()
                    claim.sample_started()
                    task = asyncio.create_task(one(sample))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except Exception as exc:
                await done.put(exc)
            total.append(count)
            await done.put(_END)

        reader = asyncio.create_task(read())
        yielded = 0
        try:
            while not total or yielded < total[0]:
                item = await done.get()
                if item is _END:
                    continue
                if isinstance(item, BaseException):
                    raise item
                yielded += 1
                yield item  # type: ignore[misc]
                in_flight.release()
        finally:
            claim.close()
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def validate(
        self, text: str | None, spec: ev.EvaluatorSpec | None, check_refs: bool, team: str
    ) -> Validation:
        if text is not None:
            result = await asyncio.to_thread(validate_json, text)
        else:
            result = await asyncio.to_thread(validate_spec, spec or ev.EvaluatorSpec())
        if result.normalized is not None and self.policy is not None:
            problems = self.policy(result.normalized)
            if problems:
                return Validation(errors=problems)
        if result.normalized is not None and check_refs:
            problems = await self.reference_problems(result.normalized, team)
            if problems:
                raise FailedPrecondition(
                    f"{problems[0].field}: {problems[0].description}", violations=problems
                )
        return result

    async def reference_problems(self, spec: ev.EvaluatorSpec, team: str) -> list[FieldViolation]:
        """Remote addresses that do not answer, model revisions that do not exist or are not
        reward models."""
        problems = []
        for i, scorer in enumerate(spec.scorers):
            path = f"scorers[{i}]"
            if scorer.HasField("remote") and self.probe is not None:
                why = await self.probe(scorer.remote.address, scorer.remote.tls)
                if why:
                    problems.append(FieldViolation(f"{path}.remote.address", why))
            if scorer.HasField("model") and self.model_check is not None:
                why = await self.model_check(scorer.model.model_revision, team)
                if why:
                    problems.append(FieldViolation(f"{path}.model.model_revision", why))
        return problems


_END = object()


STREAM_IN_FLIGHT = 64


def _context(team: str, remaining: float | None) -> ScoreContext:
    budget = MAX_REQUEST_S if remaining is None else min(remaining, MAX_REQUEST_S)
    return ScoreContext(team=team, deadline=time.monotonic() + scoring_time(budget))
