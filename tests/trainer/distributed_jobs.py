"""Shared steps of the torchrun group tests: online RL jobs on a 2-process group through the
trainer service (test_grpo_distributed.py, test_ppo_distributed.py) and group scripts run
without the services (test_distributed_fsdp.py, test_rl_group_fsdp.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file

from services.devtools.server_thread import ServerThread
from tests.trainer.conftest import (
    Inputs,
    paused_when,
    reported,
    resume,
    spec,
    wait_for,
    watch,
)
from tests.trainer.test_distributed import group_processes, rank_of
from tests.trainer.test_training import download
from tests.waiting import until
from tlm.registry.v1 import registry_pb2
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

Stub = trainer_pb2_grpc.TrainerServiceStub
STEPS = 3


@dataclass
class Run:
    job: pb.TrainingJob
    metrics: list[pb.StepMetrics]
    weights: dict[str, torch.Tensor]


async def submit(trainer: Stub, job_spec: pb.TrainingJobSpec, request_id: str) -> str:
    request = pb.CreateTrainingJobRequest(spec=job_spec, request_id=request_id)
    return (await trainer.CreateTrainingJob(request)).name


async def until_event(trainer: Stub, name: str, kind: str) -> None:
    async for event in trainer.WatchTrainingJob(pb.WatchTrainingJobRequest(name=name), timeout=180):
        if event.HasField(kind):
            return


async def finished(
    stack: ServerThread, trainer: Stub, name: str, folder: Path, lora: bool = False
) -> Run:
    job = await wait_for(trainer, name, timeout=240)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    assert job.progress.step == STEPS and job.checkpoint_step == STEPS
    events = await watch(trainer, job.name)
    revision = await download(stack.address, job.output_model_revision, folder)
    formats = registry_pb2.MODEL_FORMAT_LORA_ADAPTER, registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
    assert revision.format == formats[0 if lora else 1]  # an ordinary HF folder either way
    metrics = [e.metrics for e in events if e.HasField("metrics")]
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    return Run(job, metrics, load_file(folder / weights))


async def paused_at(name: str, kind: str) -> list[psutil.Process]:
    """Ranks 0 and 1 of the job's group, stopped (SIGSTOP) once rank 0 has written a `kind`
    event. STEPS steps take a few seconds: a test that acted after seeing the event could find
    the group done. torchrun's agent runs on (it trains nothing)."""

    def ranks() -> list[psutil.Process]:  # every process on the host is read
        return [p for p in group_processes(name) if rank_of(p) is not None]

    def reached(processes: list[psutil.Process]) -> bool:
        return len(processes) >= 2 and reported(folder_of(processes), kind)

    return await paused_when(ranks, reached, f"{kind} of {name} on both ranks", at_least=2)


def folder_of(processes: list[Any]) -> Path:
    """The job's folder: the last argument of every command line of its group."""
    return Path(processes[0].cmdline()[-1])


async def both_ranks_training(trainer: Stub, name: str) -> None:
    resume(await paused_at(name, "metrics"))


async def finished_as_ddp(stack: ServerThread, trainer: Stub, name: str, folder: Path) -> Run:
    """The run of a job planned on 2 CPU ranks (DDP), once both ranks have trained."""
    await both_ranks_training(trainer, name)
    two = await finished(stack, trainer, name, folder)
    assert two.job.device_plan.devices_per_node == 2
    assert two.job.device_plan.strategy == pb.PARALLEL_STRATEGY_DDP
    return two


async def at_first_checkpoint(trainer: Stub, name: str) -> list[psutil.Process]:
    """The job's processes, stopped once step 1's resume state is written and the trainer
    has recorded it (a restart resumes from the checkpoint the trainer knows)."""
    processes = await paused_at(name, "checkpoint")
    await until_event(trainer, name, "checkpoint")
    return processes


async def finished_after_killing_rank_1(
    stack: ServerThread, trainer: Stub, name: str, processes: list[psutil.Process], folder: Path
) -> Run:
    """SIGKILL to rank 1 of `processes` (stopped), the others let go; the run, which the
    supervisor restarted from step 1."""
    (rank1,) = [p for p in processes if rank_of(p) == 1]
    rank1.send_signal(signal.SIGKILL)
    resume(processes)
    run = await finished(stack, trainer, name, folder)
    events = await watch(trainer, name)
    changes = [e.state_change.message for e in events if e.HasField("state_change")]
    assert any("killed by SIGKILL; restarting it from step" in m for m in changes), changes
    return run


async def assert_cancel_stops_every_rank(trainer: Stub, name: str) -> None:
    await both_ranks_training(trainer, name)
    await trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=name))
    job = await wait_for(trainer, name, timeout=60)
    assert job.state == pb.TrainingJob.STATE_CANCELLED, job.error
    await until(lambda: not group_processes(name), timeout=10, what="every rank exits")


def online_spec(
    method: pb.Method,
    inputs: Inputs,
    evaluator: str,
    per_device: int,
    accumulation: int,
    resources: pb.Resources,
    name: str,
    suffix: str,
    tuning: pb.Tuning,
    **params: object,
) -> pb.TrainingJobSpec:
    """An online job (GRPO, PPO: its params as `grpo=` or `ppo=`) of STEPS steps, logging and
    saving rank 0's resume state every step, on `resources`; its output model is
    `models/{name}-{devices per node}{suffix}`."""
    devices = resources.explicit.devices_per_node or 1
    output_model = f"models/{name}-{devices}{suffix}"
    return spec(
        method,
        inputs.base,
        inputs.prompts,
        evaluator=evaluator,
        tuning=tuning,
        output_model=output_model,
        resources=resources,
        training=pb.TrainingParams(
            max_steps=STEPS,
            per_device_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            log_every=1,
            learning_rate=1e-3,
            save_every=1,  # rank 0's resume state, every step
        ),
        **params,
    )


def assert_sharded_checkpoints(processes: list[Any], *models: str) -> None:
    """Each of `models` (actor, critic) has its checkpoints in DCP shards of both ranks, in the
    job's folder (the last argument of the group's command line)."""
    folder = folder_of(processes) / "checkpoints"
    for model in models:
        shards = {p.name for p in folder.glob(f"{model}-*/*.distcp")}
        assert shards == {"__0_0.distcp", "__1_0.distcp"}, model  # each rank's (DCP)


def assert_same_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5
) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def run_script(script: str, out: Path, *args: str, nproc: int = 1, timeout: float = 120) -> Path:
    """`python -m script out args...`, under torchrun on `nproc` ranks when more than one."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [sys.executable, *(launch if nproc > 1 else []), "-m", script, str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
