"""The remote scorer: another RewardService with the same contract, called through the reward
client (services/clients/reward.py) with a deadline and its retry policy (the spec's
`max_retries`), and a circuit breaker per address."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.clients.errors import classify
from services.clients.reward import RewardClient
from services.common.client import CHANNEL_OPTIONS, RetryPolicy, call_metadata
from services.common.errors import TlmError
from services.reward import convert
from services.reward.domain import Outcome, Sample, Status
from services.reward.engine import ScoreContext
from services.specs.evaluator_defaults import duration_s
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs

# Only these say the remote is unwell; other codes are the caller's own mistake.
BREAKER_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
BACKOFF_S = 0.1  # the first retry's backoff; then doubling, at most MAX_BACKOFF_S
MAX_BACKOFF_S = 1.0
PROBE_TIMEOUT_S = 2.0
# Operator bounds on what a spec may ask of its breaker.
BREAKER_FAILURES = (1, 20)
BREAKER_RESET_S = (1.0, 300.0)


@dataclass
class Breaker:
    """Opens after `failures` consecutive failures; after `reset_s` lets a single trial call
    through (half-open), whose result closes or reopens it.

    >>> b = Breaker(failures=2, reset_s=10.0)
    >>> b.record(False, now=0.0); b.allows(now=1.0)
    True
    >>> b.record(False, now=1.0); b.allows(now=2.0), b.allows(now=11.5), b.allows(now=11.6)
    (False, True, False)
    >>> b.record(True, now=12.0); b.allows(now=12.1)
    True
    """

    failures: int
    reset_s: float
    consecutive: int = 0
    opened_at: float | None = None
    trial: bool = False

    def allows(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if self.trial or now - self.opened_at < self.reset_s:
            return False
        self.trial = True
        return True

    def record(self, ok: bool, now: float) -> None:
        self.trial = False
        if ok:
            self.consecutive, self.opened_at = 0, None
            return
        self.consecutive += 1
        if self.consecutive >= self.failures:
            self.opened_at = now


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


def _channel(address: str, tls: bool) -> grpc.aio.Channel:
    if tls:
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(), CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))


async def probe_address(address: str, tls: bool) -> str | None:
    """Why `address` does not answer gRPC health checks, or None if it does."""
    async with _channel(address, tls) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            status = classify(exc, "remote reward", address)
            return f"{address} does not answer ({status.code.name}: {status.message})"
    return None


class RemoteScorerAdapter:
    """`remote_keys` ({address: env var}, set by the operator) lists the only credentials sent
    anywhere; the service's own key (which acts for any team) never goes to a spec's address."""

    def __init__(self, remote_keys: Mapping[str, str] | None = None) -> None:
        self._clients: dict[tuple[str, bool, int], RewardClient] = {}
        self._breakers: dict[tuple[str, bool, str], Breaker] = {}
        self.remote_keys = dict(remote_keys or {})

    def problem(self, cfg: ev.RemoteScorer) -> str | None:
        """Why this deployment refuses the scorer's credentials, or None."""
        if cfg.api_key_env and self.remote_keys.get(cfg.address) != cfg.api_key_env:
            return f"not an API key the operator allows for {cfg.address} (TLM_REWARD_REMOTE_KEYS)"
        return None

    def _client(self, cfg: ev.RemoteScorer) -> RewardClient:
        """One client per (address, tls, retries): the spec's retries are its channel's."""
        retries = cfg.max_retries if cfg.HasField("max_retries") else 2
        attempts = max(1, min(retries + 1, 5))  # gRPC's cap on attempts
        key = (cfg.address, cfg.tls, attempts)
        if key not in self._clients:
            policy = RetryPolicy(attempts, BACKOFF_S, MAX_BACKOFF_S)
            self._clients[key] = RewardClient(
                cfg.address,
                retry=policy,
                credentials=grpc.ssl_channel_credentials() if cfg.tls else None,
                insecure=not cfg.tls,
                metadata=(),
            )
        return self._clients[key]

    def _breaker(self, cfg: ev.RemoteScorer, team: str) -> Breaker:
        """One per (address, tls, team): a team's failures and settings affect only itself."""
        reset = duration_s(cfg.breaker_reset) if cfg.HasField("breaker_reset") else 30.0
        failures = cfg.breaker_failures if cfg.HasField("breaker_failures") else 5
        breaker = Breaker(int(_clamp(failures, BREAKER_FAILURES)), _clamp(reset, BREAKER_RESET_S))
        return self._breakers.setdefault((cfg.address, cfg.tls, team), breaker)

    async def score(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[Outcome]:
        cfg = scorer.remote
        refused = self.problem(cfg)
        if refused:
            return [Outcome.error(f"api_key_env: {refused}")] * len(samples)
        breaker = self._breaker(cfg, ctx.team)
        if not breaker.allows(time.monotonic()):
            return [Outcome.error(f"circuit open: {cfg.address} failed repeatedly")] * len(samples)
        request = rs.ScoreRequest(samples=[convert.sample_to_proto(s) for s in samples])
        for i, msg in enumerate(request.samples):
            msg.sample_id = str(i)  # ours to match answers on; the caller's ids stay here
        if cfg.evaluator:
            request.evaluator = cfg.evaluator
        else:
            request.spec.CopyFrom(cfg.spec)
        try:
            response = await self._call(cfg, request, ctx)
        except TlmError as exc:
            if exc.remote is None:
                raise
            code = exc.remote.code
            breaker.record(code not in BREAKER_CODES, time.monotonic())
            why = f"remote {cfg.address} failed: {code.name}: {exc.remote.message}"
            return [Outcome.error(why)] * len(samples)
        except BaseException:
            breaker.trial = False  # a cancelled trial decides nothing
            raise
        breaker.record(True, time.monotonic())
        by_id = {r.sample_id: r for r in response.results}
        missing = Outcome.error(f"remote {cfg.address} returned no result for the sample")
        return [
            _outcome(by_id[str(i)]) if str(i) in by_id else missing for i in range(len(samples))
        ]

    async def _call(
        self, cfg: ev.RemoteScorer, request: rs.ScoreRequest, ctx: ScoreContext
    ) -> rs.ScoreResponse:
        timeout = duration_s(cfg.timeout) if cfg.HasField("timeout") else 10.0
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        metadata = call_metadata(key, None) if key else ()
        budget = min(timeout, ctx.remaining() - 0.1)  # for every attempt together
        client = self._client(cfg)
        return await client.score(request, timeout_s=max(budget, 0.01), metadata=metadata)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def _outcome(result: rs.SampleResult) -> Outcome:
    status = Status(result.status) if result.status else Status.ERROR
    if status == Status.OK:
        return Outcome.ok(result.reward)
    return Outcome(status, 0.0, f"remote: {result.reason}")
