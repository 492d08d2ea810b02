"""PPO sharded with FSDP2 on a 2-process torchrun group (gloo, CPU) through the real trainer,
rollout, reward and registry services on the tiny model, against one process: the job's plan
says FSDP, so every rank holds half of the actor, of its reference and of the critic
(`rl/ppo_learner.py`, `Critic.shard`).

The same global batch and settings as `test_ppo_distributed.py`'s DDP case (its helpers and its
one-process run): the rollouts are identical, every rank runs as many forward and backward
passes, FSDP's reduce-scatter sums the gradients and the joint clip takes the norm over both
models' shards; so each step's losses, KL, entropy, gradient norm, the critic's values and
returns, and the published policy (gathered to rank 0) agree with one process within 1e-5.
A group whose rank 1 is killed after the first checkpoint (the actor's and the critic's DCP
shards, one file per rank, beside the resume state) restarts from it and ends the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.devtools.server_thread import ServerThread
from tests.trainer.conftest import Inputs
from tests.trainer.distributed_jobs import (
    Stub,
    assert_sharded_checkpoints,
    at_first_checkpoint,
    both_ranks_training,
    finished,
    finished_after_killing_rank_1,
    submit,
)
from tests.trainer.test_grpo_distributed import FSDP
from tests.trainer.test_ppo_distributed import assert_same_training, one_process, ppo_spec, vowels
from tlm.trainer.v1 import trainer_pb2 as pb

pytestmark = pytest.mark.slow


async def test_an_fsdp_ppo_group_equals_one_process_on_the_same_global_batch(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = ppo_spec(inputs, await vowels(stack), 1, 1, FSDP, "-fsdp")
    name = await submit(trainer, job_spec, "ppo-fsdp-two")
    await both_ranks_training(trainer, name)
    two = await finished(stack, trainer, name, tmp_path / "two")
    assert two.job.device_plan.devices_per_node == 2
    assert two.job.device_plan.strategy == pb.PARALLEL_STRATEGY_FSDP
    assert_same_training(two, one)


async def test_a_killed_rank_resumes_an_fsdp_ppo_group_from_its_sharded_checkpoints(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    one = await one_process(stack, trainer, inputs, tmp_path / "one")
    job_spec = ppo_spec(inputs, await vowels(stack), 1, 1, FSDP, "-fsdp-killed")
    name = await submit(trainer, job_spec, "ppo-fsdp-killed")
    processes = await at_first_checkpoint(trainer, name)  # step 1's resume state and shards
    assert_sharded_checkpoints(processes, "actor", "critic")
    two = await finished_after_killing_rank_1(stack, trainer, name, processes, tmp_path / "two")
    # The steps after the restart used every rank's restored shards of actor and critic.
    assert_same_training(two, one)
