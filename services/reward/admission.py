"""Load shedding: at most N scoring calls at once; the next one is refused, not queued."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.common.errors import ResourceExhausted
from services.reward.metrics import IN_FLIGHT, SHED


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Runs on the event loop, so the check and the increment cannot interleave."""
        if self.in_flight >= self.limit:
            SHED.inc()
            raise ResourceExhausted(
                f"the reward service is handling {self.limit} scoring calls; retry with backoff"
            )
        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()
