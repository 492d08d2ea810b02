"""Prometheus metrics of the reward service, per scorer type and status."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SCORER_RESULTS = Counter(
    "tlm_reward_scorer_results_total", "Scorer results", ["scorer_type", "status", "cached"]
)
SCORER_LATENCY = Histogram(
    "tlm_reward_scorer_latency_seconds",
    "Time one scorer spent on one batch of samples",
    ["scorer_type"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60),
)
SAMPLES = Counter("tlm_reward_samples_total", "Samples scored", ["status"])
IN_FLIGHT = Gauge("tlm_reward_requests_in_flight", "Score requests being handled")
SHED = Counter("tlm_reward_requests_shed_total", "Requests refused with RESOURCE_EXHAUSTED")
