"""GRPO's actor group sharded with FSDP2 (`rl/group.py`, `Actor.shard`) on a fixed batch,
without the services: a 2-process gloo group against one unsharded process
(`tests/trainer/actor_group.py`), the same sequence of updates.

Every rank runs as many forward and backward passes (rank 1, short of micro-batches, pads with
zero-weight ones), FSDP sums the gradients in its reduce-scatter, and the reference KL and the
export are commands of the group; so the sharded update is the one process's up to float
summation order: loss, KL, entropy, grad norm, clip ratios and the reference KL of each update,
and the exported weights (gathered to rank 0: an ordinary HF folder, full or adapter) and the
push GRPO's publisher builds from them (`Actor.gathered`: the tensors a sync sends, by name)
agree within 1e-5 (measured: 5e-6 at most). The sharded checkpoint written by 2 ranks after update 2
(DCP: one file of shards per rank, trainable weights and optimizer state only) resumes in one
process and ends with the 2-rank run's weights, within 1e-5 (measured: 1e-6); a replica's
resume state (its weights whole) is refused by the sharded actor.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from tests.trainer.actor_group import CASES
from tests.trainer.distributed_jobs import assert_same_weights, run_script

pytestmark = pytest.mark.slow
SCRIPT = "tests.trainer.actor_group"
COMPARED = (
    "loss",
    "kl",
    "entropy",
    "grad_norm",
    "clip_ratio/region",
    "logprob_mismatch",
    "reference_kl",
)


def run(out: Path, *args: str, nproc: int = 1) -> Path:
    return run_script(SCRIPT, out, *args, nproc=nproc, timeout=240)


def metrics(out: Path) -> list[dict[str, float]]:
    return list(json.loads((out / "metrics.json").read_text()))


def exported(out: Path, lora: bool) -> dict[str, torch.Tensor]:
    return load_file(
        out / "export" / ("adapter_model.safetensors" if lora else "model.safetensors")
    )


def checkpointed(out: Path) -> set[str]:
    """The tensors of the run's sharded checkpoint, by name, and its files."""
    (folder,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    return set(dcp.FileSystemReader(folder).read_metadata().state_dict_metadata)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_sharded_actor_group_updates_as_one_process_and_resumes_on_one_rank(
    tmp_path: Path, lora: bool
) -> None:
    tuning = ["--lora"] if lora else []
    two = run(tmp_path / "two", "--fsdp", "--save-at", "2", *tuning, nproc=2)
    one = run(tmp_path / "one", *tuning)
    assert json.loads((two / "sharded.json").read_text()) is True  # DTensor shards
    assert json.loads((one / "sharded.json").read_text()) is False
    assert len(metrics(two)) == len(metrics(one)) == len(CASES)
    for case, a, b in zip(CASES, metrics(two), metrics(one), strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (case, key)
        assert b["kl"] > 0 and b["grad_norm"] > 0 and b["reference_kl"] != 0  # k1 may be < 0
    assert_same_weights(exported(two, lora), exported(one, lora))
    pushed = load_file(two / "pushed.safetensors")
    assert_same_weights(pushed, load_file(one / "pushed.safetensors"))
    assert any("lora_A" in n for n in pushed) == lora and "lm_head.weight" not in pushed
    assert "does not load into a sharded (FSDP) actor" in json.loads(
        (two / "refused.json").read_text()
    )
    assert not (one / "refused.json").exists()
    names = checkpointed(two)
    assert any("lora_A" in n for n in names) == lora
    # LoRA's frozen base is not in it (the base model has it); full tuning's weights are.
    assert any("embed_tokens" in n for n in names) != lora
    resumed = run(tmp_path / "resumed", "--resume", str(two / "state.pt"), *tuning)
    assert [m["loss"] for m in metrics(resumed)] == pytest.approx(
        [m["loss"] for m in metrics(two)[2:]], abs=1e-5
    )
    assert_same_weights(exported(resumed, lora), exported(two, lora))
