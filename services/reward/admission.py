"""Per-team fair load shedding: a batch of samples being scored holds one slot; a call that finds
no slot for its team is refused, not queued.

Every active team (one holding a slot) is guaranteed `limit // active_teams` slots, at least
one; beyond its share a team may borrow slots nobody uses, up to `limit` in all. A team under
its share is admitted even when others have borrowed every slot, so one team cannot lock the
others out; the total then exceeds `limit` until the borrowed slots come back.

A StreamScore stream holds one slot only while some of its samples are being scored
(`StreamClaim`): an open, idle stream holds nothing, and is closed after `idle_s` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from services.common.errors import DeadlineExceeded, ResourceExhausted, TlmError
from services.reward.metrics import IN_FLIGHT, SHED

log = structlog.get_logger("tlm.reward")


class Admission:
    """Runs on the event loop, so a check and its increment cannot interleave."""

    def __init__(self, limit: int, idle_s: float) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self.held: dict[str, int] = {}
        self.total = 0

    def share(self, team: str) -> int:
        """The slots `team` is guaranteed, counting it as active."""
        active = len(self.held) + (team not in self.held)
        return max(1, self.limit // active)

    def acquire(self, team: str) -> None:
        held, share = self.held.get(team, 0), self.share(team)
        if held >= share and self.total >= self.limit:
            SHED.inc()
            log.info("request_shed", team=team, held=held, share=share, total=self.total)
            raise ResourceExhausted(
                f"team {team!r} has {held} scoring calls in flight, its share of this reward "
                f"service ({self.limit} calls, {len(self.held)} teams active); retry with backoff"
            )
        self.held[team] = held + 1
        self.total += 1
        IN_FLIGHT.inc()

    def release(self, team: str) -> None:
        self.held[team] -= 1
        if not self.held[team]:
            del self.held[team]
        self.total -= 1
        IN_FLIGHT.dec()

    @contextmanager
    def slot(self, team: str) -> Iterator[None]:
        self.acquire(team)
        try:
            yield
        finally:
            self.release(team)


class StreamClaim:
    """What an open stream holds: one slot while any of its samples is being scored, none while
    idle. After `admission.idle_s` idle, `on_idle` gets the error that ends the stream."""

    def __init__(
        self, admission: Admission, team: str, on_idle: Callable[[TlmError], None]
    ) -> None:
        self.admission = admission
        self.team = team
        self.on_idle = on_idle
        self.scoring = 0
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def sample_started(self) -> None:
        """Raises ResourceExhausted when the stream needs a slot and its team gets none."""
        if self.scoring == 0:
            self.admission.acquire(self.team)
            self._disarm()
        self.scoring += 1

    def sample_done(self) -> None:
        if self.closed:
            return  # a task cancelled after close(): its slot is already returned
        self.scoring -= 1
        if self.scoring == 0:
            self.admission.release(self.team)
            self._arm()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._disarm()
        if self.scoring:
            self.admission.release(self.team)

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.admission.idle_s, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        log.info("stream_idle_closed", team=self.team, idle_s=self.admission.idle_s)
        self.on_idle(idle_error(self.admission.idle_s))


def idle_error(idle_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"StreamScore stream idle: no sample for {idle_s:g}s (TLM_REWARD_STREAM_IDLE_TIMEOUT_S); "
        "open a new stream to score more"
    )
