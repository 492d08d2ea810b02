"""GRPO's actor group (`rl/group.py`) on a fixed batch, without the services: a 2-process gloo
group against one process (`tests/trainer/actor_group.py`), the same sequence of updates.

Each loss type's micro-batch weights come from the whole batch's mask (the global normaliser:
`grpo`/`dr_grpo` a micro-batch's share of the samples in the loss, `dapo` the batch's tokens,
`bnpo` 1 / micro-batches), whichever rank trains the micro-batch, and the ranks' gradients are
summed; so the group's update is the one process's up to float summation order, including a
rank with 2 micro-batches and one with 1, and a rank with none. Loss, KL, entropy, grad norm
and clip ratios of each update, and the final weights, agree within 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.devtools.tiny_models import cached_tiny_model
from tests.trainer.actor_group import CASES

pytestmark = pytest.mark.slow
SCRIPT = "tests.trainer.actor_group"
COMPARED = ("loss", "kl", "entropy", "grad_norm", "clip_ratio/region", "logprob_mismatch")


def run(out: Path, nproc: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [sys.executable, *(launch if nproc > 1 else []), "-m", SCRIPT, str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), load_file(out / "weights.safetensors")


def test_a_two_rank_actor_group_updates_as_one_process_for_every_loss_type(
    tmp_path: Path,
) -> None:
    (two, two_weights), (one, one_weights) = run(tmp_path / "two", 2), run(tmp_path / "one", 1)
    assert len(two) == len(one) == len(CASES)
    for case, a, b in zip(CASES, two, one, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (case, key)
        assert b["kl"] > 0 and b["grad_norm"] > 0
    base = load_file(cached_tiny_model("test") / "model.safetensors")
    assert any(not torch.equal(base[k], one_weights[k]) for k in base)  # it trained
    assert two_weights.keys() == one_weights.keys()
    for key in one_weights:
        torch.testing.assert_close(two_weights[key], one_weights[key], atol=1e-5, rtol=0)
