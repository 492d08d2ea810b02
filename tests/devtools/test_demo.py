"""The demo's bar on the GRPO reward curve (the demo itself is `make demo`: minutes)."""

from __future__ import annotations

from services.devtools.demo import FIRST_BELOW, LAST_ABOVE, LAST_STEPS, _passed


def test_the_curve_must_start_below_and_end_above_the_bar() -> None:
    rising = [0.1, 0.3, 0.6, 0.9, 0.95, 1.0, 0.9, 0.95]
    assert _passed(rising)
    assert not _passed([FIRST_BELOW, *rising[1:]])  # the start is not below the bar
    assert _passed([0.1, 0.3, 1.0, 1.0, 1.0, 1.0, 0.6])  # the last five average 0.92
    assert not _passed([0.1, 0.9, 0.9, 0.9, 0.6, 0.6])  # ... 0.78
    assert not _passed([0.1] + [LAST_ABOVE] * LAST_STEPS)  # not above
    assert not _passed([0.1] + [1.0] * (LAST_STEPS - 2))  # too few steps logged
