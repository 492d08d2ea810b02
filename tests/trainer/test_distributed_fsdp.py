"""FSDP2 on torch.distributed itself (`distributed.shard_model`, `save_sharded`, `load_sharded`,
`full_state_dict`): a 2-process gloo group on CPU trains the tiny model sharded, and

- equals one unsharded process on the same global batch (4 equal-length rows, 2 per rank: the
  mean of the ranks' mean losses is the global mean, and FSDP averages the gradients), within
  2e-5 after 3 AdamW steps at lr 1e-2 (float reduction order; measured 1.5e-5 at most);
- its sharded checkpoint of step 2, written by 2 ranks, resumes in one process (DCP reshards)
  and step 3 then gives the 2-process run's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.devtools.tiny_models import cached_tiny_model
from tests.trainer.distributed_jobs import assert_same_weights, run_script

pytestmark = pytest.mark.slow
SCRIPT = "tests.trainer.fsdp_group"


def run(out: Path, *args: str, nproc: int = 1) -> Path:
    return run_script(SCRIPT, out, *args, nproc=nproc)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "weights.safetensors")


def test_fsdp2_group_equals_one_process_and_its_checkpoint_resumes_on_one_rank(
    tmp_path: Path,
) -> None:
    sharded = run(tmp_path / "two", "--steps", "3", "--save-at", "2", nproc=2)
    assert json.loads((sharded / "sharded.json").read_text()) is True  # DTensor shards
    assert sorted(p.name for p in (sharded / "checkpoint").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # one file of shards per rank
    single = run(tmp_path / "one", "--steps", "3")
    two, one = weights(sharded), weights(single)
    assert_same_weights(two, one, atol=2e-5)
    losses = [json.loads((out / "losses.json").read_text()) for out in (sharded, single)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    base = load_file(cached_tiny_model("test") / "model.safetensors")
    assert any(not torch.equal(base[k], one[k]) for k in base if k in one)  # it trained
    resumed = run(
        tmp_path / "resumed",
        "--steps",
        "3",
        "--start",
        "2",
        "--resume",
        str(sharded / "checkpoint"),
    )
    for name, value in weights(resumed).items():
        torch.testing.assert_close(value, two[name], atol=1e-6, rtol=0)
