"""PPO's learner on a 2-process gloo group (`tests/trainer/ppo_group.py`) against one process,
without the services: the same 3 batches, a resume between the second and the third.

The targets' forward passes are dealt by micro-batch and summed over the ranks, the update's
micro-batches are weighted by their share of the whole mini-batch's tokens, the actor's and
the critic's gradients are summed before the joint clip, and the statistics are merged; so the
group's update is the one process's up to the order of float sums, including a mini-batch that
leaves rank 1 no micro-batch. Every metric of each batch, and the final actor and critic
weights, agree within 1e-5; the third batch, after rank 0 restored the state saved after the
first, replays the second, and agrees only if every rank's actor and critic were restored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
SCRIPT = "tests.trainer.ppo_group"
COMPARED = (
    "loss",
    "value_loss",
    "value_clip_fraction",
    "kl",
    "kl_coef",
    "entropy",
    "approx_kl",
    "grad_norm",
    "clip_ratio/region",
    "explained_variance",
    "returns_mean",
    "values_mean",
)


def run(out: Path, nproc: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [sys.executable, *(launch if nproc > 1 else []), "-m", SCRIPT, str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), load_file(out / "weights.safetensors")


def test_a_two_rank_ppo_learner_equals_one_process_through_a_resume(tmp_path: Path) -> None:
    (two, two_weights), (one, one_weights) = run(tmp_path / "two", 2), run(tmp_path / "one", 1)
    assert len(two) == len(one) == 3
    for batch, (a, b) in enumerate(zip(two, one, strict=True)):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (batch, key)
        assert b["kl"] != 0 and b["grad_norm"] > 0 and b["value_loss"] > 0  # k1 may be < 0
    assert one[0]["kl_coef"] != one[1]["kl_coef"]  # adaptive: kl_coef and the count travel
    for key in COMPARED:  # resumed from the state after the first: the second, replayed
        assert one[2][key] == pytest.approx(one[1][key], abs=1e-6), key
    assert two_weights.keys() == one_weights.keys()
    assert any(k.startswith("critic.") for k in one_weights)
    for key in one_weights:
        torch.testing.assert_close(two_weights[key], one_weights[key], atol=1e-5, rtol=0)
