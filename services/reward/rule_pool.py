"""Which rule worker each team's chunk runs on (`Pool`): the policy of the rule runner's worker
processes, apart from the processes themselves (a worker here is anything with `give_back` and
`keep`, see `rule_worker.Worker`). Runs on the event loop only."""

from __future__ import annotations

import asyncio
from collections import deque

from services.reward.rule_worker import Worker

# A worker asked back whose sample still runs this much later is killed (and replaced): the wait
# of a team that holds no worker is bounded by this plus a worker's start (1-2 s).
RECLAIM_GRACE_S = 0.5


class Pool:
    """Ready workers, the teams waiting for one and who holds which; runs on the event loop
    only. A free worker goes to the waiting team holding the fewest; none stays idle while a
    team waits. When a team holding none waits and none is free (nor starting), a team holding
    several gives one back (`Worker.give_back`), the team holding the most first, its most
    recently handed-out worker first; one per such waiting team, and asks no longer needed are
    withdrawn. A chunk that lost its worker that way (its sample killed) runs on a worker that
    is not asked back again, one such worker per team (the one a team always keeps)."""

    def __init__(self) -> None:
        self.free: list[Worker] = []
        self.held: dict[str, int] = {}  # workers each team is using now
        self.busy: dict[Worker, str] = {}  # worker -> the team using it, in hand-out order
        self.kept: set[Worker] = set()  # busy with a chunk that must not be asked back
        self.reclaiming: set[Worker] = set()  # asked back, not released yet
        self.coming = 0  # workers starting (expect() .. add() or gave_up())
        # Waiting calls per team (with their `kept`); dict order is the order teams are served
        # in on a tie.
        self.waiting: dict[str, deque[tuple[asyncio.Future[Worker | None], bool]]] = {}
        self.closed = False

    def _dispatch(self) -> None:
        while self.free and self.waiting:
            team = min(self.waiting, key=lambda t: self.held.get(t, 0))
            queue = self.waiting.pop(team)
            future, kept = queue.popleft()
            if queue:
                self.waiting[team] = queue  # to the back of the line
            if future.done():
                continue
            worker = self.free.pop()
            worker.keep()  # whatever was asked of it before
            if kept and not any(self.busy[w] == team for w in self.kept):
                self.kept.add(worker)
            self.busy[worker] = team
            self.held[team] = self.held.get(team, 0) + 1
            future.set_result(worker)
        self._reclaim()

    def _reclaim(self) -> None:
        """As many workers asked back as teams holding none wait, less those starting."""
        starving = sum(1 for team in self.waiting if not self.held.get(team))
        owed = starving - self.coming - len(self.reclaiming)
        while owed < 0 and self.reclaiming:
            self.reclaiming.pop().keep()
            owed += 1
        if owed <= 0:
            return
        asked = {t: 0 for t in self.held}
        for worker in self.reclaiming:
            asked[self.busy[worker]] += 1
        newest_first = reversed(list(self.busy.items()))  # the least work lost
        for worker, team in sorted(newest_first, key=lambda wt: -self.held[wt[1]]):
            if owed <= 0:
                return
            if worker in self.kept or worker in self.reclaiming:
                continue
            if self.held[team] - asked[team] > 1:  # each team keeps one
                asked[team] += 1
                self.reclaiming.add(worker)
                worker.give_back(RECLAIM_GRACE_S)
                owed -= 1

    async def acquire(self, team: str, timeout: float, *, kept: bool = False) -> Worker | None:
        """A worker for `team`, or None at the timeout or once closed. `kept`: see the class."""
        if self.closed:
            return None
        future: asyncio.Future[Worker | None] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(team, deque()).append((future, kept))
        self._dispatch()
        if future.done():  # no yield to the loop: the caller sends its chunk at once
            return future.result()
        try:
            await asyncio.wait({future}, timeout=max(timeout, 0.0))
        except asyncio.CancelledError:
            self._forget(team, future)
            raise
        if future.done():
            return future.result()
        self._forget(team, future)
        return None

    def _forget(self, team: str, future: asyncio.Future[Worker | None]) -> None:
        if future.done() and not future.cancelled() and (worker := future.result()) is not None:
            self.release(team, worker, reuse=True)  # handed over just as the caller left
            return
        future.cancel()
        queue = self.waiting.get(team)
        if queue is not None:
            queue = deque(item for item in queue if item[0] is not future)
            if queue:
                self.waiting[team] = queue
            else:
                del self.waiting[team]
        self._reclaim()  # one fewer may be waiting

    def release(self, team: str, worker: Worker, *, reuse: bool) -> None:
        """`team` is done with `worker`: free again if `reuse`, else retired."""
        self.held[team] -= 1
        if not self.held[team]:
            del self.held[team]
        del self.busy[worker]
        self.kept.discard(worker)
        self.reclaiming.discard(worker)
        if reuse and not self.closed:
            self.free.append(worker)
        self._dispatch()

    def expect(self) -> None:
        """A worker is starting (a replacement: before the old one's release); add() or
        gave_up() follows."""
        self.coming += 1

    def gave_up(self) -> None:
        """A start failed: it is retried, but no longer counted as coming."""
        self.coming -= 1
        self._reclaim()

    def add(self, worker: Worker, *, expected: bool = True) -> None:
        if expected:
            self.coming -= 1
        if self.closed:
            return
        self.free.append(worker)
        self._dispatch()

    def close(self) -> None:
        self.closed = True
        self.free.clear()
        for queue in self.waiting.values():
            for future, _ in queue:
                if not future.done():
                    future.set_result(None)
        self.waiting.clear()
