"""PPO's learner on a 2-process gloo group (`tests/trainer/ppo_group.py`) against one process,
without the services: the same 3 batches, a resume between the second and the third.

Replicated (DDP), the targets' forward passes are dealt by micro-batch and summed over the
ranks, the update's micro-batches are weighted by their share of the whole mini-batch's tokens,
the actor's and the critic's gradients are summed before the joint clip, and the statistics are
merged; so the group's update is the one process's up to the order of float sums, including a
mini-batch that leaves rank 1 no micro-batch. Every metric of each batch, and the final actor
and critic weights, agree within 1e-5; the third batch, after rank 0 restored the state saved
after the first, replays the second, and agrees only if every rank's actor and critic were
restored.

Sharded (FSDP2: the actor, its reference and the critic, full or LoRA), every rank runs as many
passes (rank 1 pads with zero-weight ones, not in the statistics), FSDP's reduce-scatter sums
the gradients and the joint clip takes the norm over both models' shards: the same metrics and
final weights (the policy gathered as it is published, the critic read back from its sharded
checkpoint) agree with one process within 1e-5 (measured: 3e-6 at most). The resume state names
the actor's and the critic's DCP checkpoints (one file of shards per rank); it resumes in one
process, which then ends with the 2-rank run's weights; a replica's state is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.distributed_jobs import assert_same_weights, run_script

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
Run = tuple[list[dict[str, float]], dict[str, torch.Tensor]]


def run(out: Path, *args: str, nproc: int = 1) -> Run:
    run_script(SCRIPT, out, *args, nproc=nproc, timeout=240)
    return json.loads((out / "metrics.json").read_text()), load_file(out / "weights.safetensors")


def assert_same(a: Run, b: Run) -> None:
    """Every compared metric of each batch, and every final weight, within 1e-5."""
    assert len(a[0]) == len(b[0])
    for batch, (x, y) in enumerate(zip(a[0], b[0], strict=True)):
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], abs=1e-5), (batch, key)
    assert any(k.startswith("critic.") and "score" in k for k in a[1])  # the value head
    assert_same_weights(a[1], b[1])


ONE: dict[str, Run] = {}  # the one-process reference per tuning, run once for the module


def one_process(folder: Path, *tuning: str) -> Run:
    key = " ".join(tuning)
    if key not in ONE:
        ONE[key] = run(folder / f"one{key}", *tuning)
    return ONE[key]


def test_a_two_rank_ppo_learner_equals_one_process_through_a_resume(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.getbasetemp()
    two, one = run(folder / "two-ddp", nproc=2), one_process(folder)
    assert_same(two, one)
    for values in one[0]:
        assert values["kl"] != 0 and values["grad_norm"] > 0 and values["value_loss"] > 0
    assert one[0][0]["kl_coef"] != one[0][1]["kl_coef"]  # adaptive: kl_coef and count travel
    for key in COMPARED:  # resumed from the state after the first: the second, replayed
        assert one[0][2][key] == pytest.approx(one[0][1][key], abs=1e-6), key


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_sharded_ppo_learner_equals_one_process_and_its_checkpoint_resumes_on_one_rank(
    tmp_path_factory: pytest.TempPathFactory, lora: bool
) -> None:
    folder, suffix = tmp_path_factory.getbasetemp(), "-lora" if lora else ""
    tuning = ["--lora"] if lora else []
    out = folder / f"two-fsdp{suffix}"
    two = run(out, "--fsdp", *tuning, nproc=2)
    assert json.loads((out / "sharded.json").read_text()) is True  # DTensor shards
    assert_same(two, one_process(folder, *tuning))
    assert "does not load into a sharded (FSDP) critic" in json.loads(
        (out / "refused.json").read_text()
    )
    state = torch.load(out / "state.pt", weights_only=False)
    critic = state["learner"]["critic"]["shards"]
    assert critic.startswith("critic-")  # beside the actor's
    for name in (state["actor"]["shards"], critic):
        files = sorted(p.name for p in (out / "checkpoints" / name).glob("*.distcp"))
        assert files == ["__0_0.distcp", "__1_0.distcp"], name  # one file of shards per rank
    resumed = folder / f"resumed{suffix}"
    one_rank = run(resumed, *tuning, "--resume", str(out / "state.pt"))
    assert json.loads((resumed / "sharded.json").read_text()) is False
    assert_same(([two[0][-1]], two[1]), one_rank)  # the third batch, from the first's state
