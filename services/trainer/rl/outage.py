"""Jobs that wait through service outages (issue 12): the ports of `rl/ports.py` behind a guard.

The service clients retry UNAVAILABLE and DEADLINE_EXCEEDED a few times within seconds; what
still fails after that is an outage (a reward service restarting, a rollout replica rescheduled)
and should not fail a job of hours. The guard keeps calling with capped exponential backoff and
full jitter (the AWS Architecture Blog's "Exponential Backoff and Jitter") for up to
`outage_timeout_s`, reports "waiting for <service> at <address>" as a job event (a warning, not a
failure) and "<service> at <address> answered again" when it is back, and then fails the job
UNAVAILABLE naming the service. A retried call repeats the step's own request ids (Generate
`{job}-s{step}`, Score's sample ids, the upload's `{job}-step-{step}`), so the step is neither
lost nor done twice. A cancel stops the wait at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from services.common.errors import DeadlineExceeded, TlmError, Unavailable
from services.trainer.rl.batch import Row, Sample, Score
from services.trainer.rl.grpc_ports import policy_lost
from services.trainer.rl.ports import PolicyPublisher, PolicyRef, PromptSource, Sampler, Scorer
from services.trainer.spec import Sampling

T = TypeVar("T")
OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
FIRST_WAIT_S, MAX_WAIT_S = 0.5, 15.0  # the backoff's first and largest wait
STOP_CHECK_S = 0.5  # a cancel is seen within this while waiting


class ServiceOutage(Unavailable):
    """A service stayed unreachable for longer than the job's outage timeout."""


@dataclass(frozen=True)
class Endpoint:
    """A service the job calls: `service` ("rollout", "reward", "registry") at `address`."""

    service: str
    address: str


def is_outage(exc: BaseException) -> bool:
    """UNAVAILABLE or DEADLINE_EXCEEDED from a service, after its client's own retries (as
    the status, or as the domain errors a client maps them to). Never a ServiceOutage: that
    is the guard's own verdict."""
    if isinstance(exc, ServiceOutage):
        return False
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in OUTAGE_CODES
    return isinstance(exc, Unavailable | DeadlineExceeded)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds before retry `attempt` (0-based): uniform in [0, min(MAX, FIRST x 2^attempt)],
    never below a tenth of the first wait (no busy loop).

    >>> rng = random.Random(0)
    >>> all(0.05 <= backoff(a, rng) <= min(15.0, 0.5 * 2**a) for a in range(12))
    True
    """
    cap = min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** min(attempt, 16))
    return max(FIRST_WAIT_S / 10, rng.uniform(0, cap))


class OutageGuard:
    """Calls through which an outage becomes waiting: `note(message, level)` records the job
    events, `check_stop()` raises when the job is cancelled."""

    def __init__(
        self,
        timeout_s: float,
        note: Callable[[str, str], None],
        check_stop: Callable[[], None],
        seed: int = 0,
    ) -> None:
        self.timeout_s, self.note, self.check_stop = timeout_s, note, check_stop
        self._rng = random.Random(seed)
        self.waits: list[tuple[Endpoint, float]] = []  # (service, seconds down) per outage

    async def call(self, endpoint: Endpoint, fn: Callable[[], Awaitable[T]]) -> T:
        down_since: float | None = None
        attempt = 0
        while True:
            try:
                result = await fn()
            except Exception as exc:
                if not is_outage(exc):
                    self._back(endpoint, down_since)  # it answered, if with an error
                    raise
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    self.note(
                        f"waiting for {endpoint.service} at {endpoint.address} "
                        f"({_describe(exc)}); retrying for up to {self.timeout_s:g} s "
                        "(outage_timeout_s)",
                        "warning",
                    )
                elapsed = now - down_since
                if elapsed >= self.timeout_s:
                    raise ServiceOutage(
                        f"the {endpoint.service} service at {endpoint.address} was unreachable "
                        f"for {elapsed:.0f} s, longer than outage_timeout_s "
                        f"({self.timeout_s:g} s); last error {_describe(exc)}",
                        metadata={"service": endpoint.service, "address": endpoint.address},
                    ) from exc
                await self._sleep(min(backoff(attempt, self._rng), self.timeout_s - elapsed))
                attempt += 1
                continue
            self._back(endpoint, down_since)
            return result

    def _back(self, endpoint: Endpoint, down_since: float | None) -> None:
        if down_since is None:
            return
        elapsed = time.monotonic() - down_since
        self.waits.append((endpoint, elapsed))
        self.note(
            f"{endpoint.service} at {endpoint.address} answered again after {elapsed:.1f} s",
            "info",
        )

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + max(seconds, 0.0)
        while (left := deadline - time.monotonic()) > 0:
            self.check_stop()
            await asyncio.sleep(min(STOP_CHECK_S, left))
        self.check_stop()


# The ports, guarded ---------------------------------------------------------------------------


class GuardedPrompts:
    def __init__(self, inner: PromptSource, guard: OutageGuard, registry: Endpoint) -> None:
        self.inner, self.guard, self.endpoint = inner, guard, registry

    async def open(self) -> int:
        return await self.guard.call(self.endpoint, self.inner.open)

    async def batch(self, step: int, size: int) -> list[Row]:
        return await self.guard.call(self.endpoint, lambda: self.inner.batch(step, size))

    async def read(self, limit: int = 0) -> list[Row]:
        return await self.guard.call(self.endpoint, lambda: self.inner.read(limit))


class GuardedSampler:
    def __init__(self, inner: Sampler, guard: OutageGuard, rollout: Endpoint) -> None:
        self.inner, self.guard, self.endpoint = inner, guard, rollout

    async def generate(
        self, rows: list[Row], sampling: Sampling, policy: PolicyRef, request_id: str
    ) -> list[Sample]:
        return await self.guard.call(
            self.endpoint, lambda: self.inner.generate(rows, sampling, policy, request_id)
        )


class GuardedScorer:
    def __init__(self, inner: Scorer, guard: OutageGuard, reward: Endpoint) -> None:
        self.inner, self.guard, self.endpoint = inner, guard, reward

    async def score(
        self, rows: list[Row], samples: list[Sample], group_size: int, tag: str
    ) -> list[Score]:
        return await self.guard.call(
            self.endpoint, lambda: self.inner.score(rows, samples, group_size, tag)
        )


class GuardedPublisher:
    """An outage that escapes `publish` is the rollout's: the registry upload inside it is
    guarded on its own (`guarded_upload`), and a publish retried after the upload re-sends it
    with the same request id, which stores no second revision. A rollout that came back
    without the base the job's adapters load on (a restarted replica) gets it served again,
    once, before the publish is repeated."""

    def __init__(self, inner: PolicyPublisher, guard: OutageGuard, rollout: Endpoint) -> None:
        self.inner, self.guard, self.endpoint = inner, guard, rollout

    async def serve(self, policy: PolicyRef | None) -> PolicyRef:
        return await self.guard.call(self.endpoint, lambda: self.inner.serve(policy))

    async def publish(self, folder: Path, step: int) -> PolicyRef:
        try:
            return await self.guard.call(self.endpoint, lambda: self.inner.publish(folder, step))
        except TlmError as exc:
            if not policy_lost(exc):
                raise
        await self.serve(None)
        return await self.guard.call(self.endpoint, lambda: self.inner.publish(folder, step))


def guarded_upload(
    upload: Callable[[Path, str], Awaitable[str]], guard: OutageGuard, registry: Endpoint
) -> Callable[[Path, str], Awaitable[str]]:
    async def call(folder: Path, request_id: str) -> str:
        return await guard.call(registry, lambda: upload(folder, request_id))

    return call
