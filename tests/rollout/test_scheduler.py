"""The tokens/s meter: thread safety and bounded memory."""

from __future__ import annotations

import sys
import threading

from services.rollout.scheduler import Throughput


def test_the_meter_is_safe_from_two_threads() -> None:
    # A decode thread adds while the event loop reads the rate (GetEngineStatus); reading must
    # never see the deque mutate under it.
    meter, errors, stop = Throughput(window_s=0.05), [], threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                meter.rate()
        except Exception as exc:  # e.g. "deque mutated during iteration"
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=read)
    try:
        reader.start()
        for _ in range(100_000):
            meter.add(1)
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(interval)
    assert errors == [] and meter.total == 100_000


def test_the_meter_forgets_old_events_without_being_polled() -> None:
    # 10 tokens per second for 1000 s with a 60 s window: about 60 events are kept, and the
    # rate is 10 tokens over each second of the window.
    now = [0.0]
    meter = Throughput(window_s=60.0, clock=lambda: now[0])
    for _ in range(1000):
        now[0] += 1.0
        meter.add(10)
    assert len(meter) <= 61 and meter.total == 10_000
    assert abs(meter.rate() - 10 * 61 / 60) < 1e-9  # 61 events in [940, 1000], a 60 s span
    now[0] += 120.0
    assert meter.rate() == 0.0 and len(meter) == 0
