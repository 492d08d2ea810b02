"""Multi-device jobs end to end: 2-process torchrun groups (gloo, CPU) through the real trainer
service on the tiny model. DDP on CPU through accelerate: TRL's trainers shard FSDP on GPUs.

Same global batch: one process of 4 rows per step against two of 2. TRL averages the loss over
the tokens of all ranks (average_tokens_across_devices) and accelerate deals each rank its
consecutive share of the same seeded order, so the two runs see the same rows and take the
same steps; they differ by float reduction order only (tolerance 1e-5).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from google.rpc import code_pb2
from safetensors.torch import load_file

from services.devtools.server_thread import ServerThread
from services.devtools.tiny_models import cached_tiny_model
from services.trainer.distributed import CANCEL_FILE, RANK_ERRORS, root_cause
from services.trainer.launchers import LocalLauncher, LocalWorkers
from services.trainer.supervisor import worker_env
from services.trainer.worker_protocol import EVENTS_FILE
from tests.trainer.conftest import Inputs, spec, wait_for
from tests.trainer.test_training import LORA, download
from tests.waiting import until
from tlm.registry.v1 import registry_pb2
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
Stub = trainer_pb2_grpc.TrainerServiceStub
FULL = pb.Tuning(full=pb.FullTuning())
TWO_CPUS = pb.Resources(explicit=pb.DevicePlan(device_type=pb.DEVICE_TYPE_CPU, devices_per_node=2))
ONE_CPU = pb.Resources(explicit=pb.DevicePlan(device_type=pb.DEVICE_TYPE_CPU))


def training(batch: int, steps: int = 3) -> pb.TrainingParams:
    return pb.TrainingParams(
        max_steps=steps,
        per_device_batch_size=batch,
        max_length=32,
        log_every=1,
        save_every=0,
        learning_rate=1e-3,
    )


async def create(trainer: Stub, job_spec: pb.TrainingJobSpec, key: str) -> str:
    request = pb.CreateTrainingJobRequest(spec=job_spec, request_id=f"dist-{key}")
    return (await trainer.CreateTrainingJob(request)).name


def group_processes(job_name: str) -> list[psutil.Process]:
    """The job's launcher and workers: processes whose command line names its folder."""
    job_id = job_name.removeprefix("jobs/")
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(job_id in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def rank_of(proc: psutil.Process) -> int | None:
    try:
        value = proc.environ().get("RANK")
    except psutil.Error:
        return None
    return int(value) if value is not None else None


@pytest.mark.parametrize(
    ("method", "dataset"), [(pb.METHOD_SFT, "sft"), (pb.METHOD_DPO, "preference")]
)
async def test_two_processes_equal_one_on_the_same_global_batch(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path, method: int, dataset: str
) -> None:
    name = pb.Method.Name(method).removeprefix("METHOD_").lower()
    data = getattr(inputs, dataset)
    two = spec(
        method, inputs.base, data, tuning=FULL, training=training(2),
        resources=TWO_CPUS, output_model=f"models/dist-{name}-2",
    )  # fmt: skip
    one = spec(
        method, inputs.base, data, tuning=FULL, training=training(4),
        resources=ONE_CPU, output_model=f"models/dist-{name}-1",
    )  # fmt: skip
    names = [await create(trainer, two, f"{name}-2"), await create(trainer, one, f"{name}-1")]
    jobs = [await wait_for(trainer, job, timeout=180) for job in names]
    for job in jobs:
        assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    assert jobs[0].device_plan.devices_per_node == 2
    assert jobs[0].device_plan.strategy == pb.PARALLEL_STRATEGY_DDP
    assert jobs[1].device_plan.strategy == pb.PARALLEL_STRATEGY_SINGLE_DEVICE
    loss = [job.final_metrics["train_loss"] for job in jobs]
    assert loss[0] == pytest.approx(loss[1], abs=1e-5)
    weights = []
    for i, job in enumerate(jobs):
        revision = await download(stack.address, job.output_model_revision, tmp_path / str(i))
        assert revision.format == registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
        weights.append(load_file(tmp_path / str(i) / "model.safetensors"))
    base = load_file(cached_tiny_model("test") / "model.safetensors")
    assert any(not torch.equal(base[k], weights[1][k]) for k in base)  # it trained
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-5, rtol=0)


async def test_two_process_lora_sft_publishes_an_adapter_that_loads(
    stack: ServerThread, trainer: Stub, inputs: Inputs, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job_spec = spec(
        pb.METHOD_SFT, inputs.base, inputs.sft, tuning=LORA, training=training(2),
        resources=TWO_CPUS, output_model="models/dist-lora",
    )  # fmt: skip
    job = await wait_for(trainer, await create(trainer, job_spec, "lora"), timeout=180)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    revision = await download(stack.address, job.output_model_revision, tmp_path / "adapter")
    assert revision.format == registry_pb2.MODEL_FORMAT_LORA_ADAPTER
    await download(stack.address, inputs.base, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # peft starts lora_B at zero


@pytest.mark.parametrize(
    ("method", "dataset"), [(pb.METHOD_KTO, "unpaired"), (pb.METHOD_REWARD_MODEL, "preference")]
)
async def test_kto_and_a_reward_model_train_on_two_processes(
    trainer: Stub, inputs: Inputs, method: int, dataset: str
) -> None:
    name = pb.Method.Name(method).removeprefix("METHOD_").lower().replace("_", "-")
    job_spec = spec(
        method, inputs.base, getattr(inputs, dataset), tuning=LORA, training=training(2),
        resources=TWO_CPUS, output_model=f"models/dist-{name}",
    )  # fmt: skip
    job = await wait_for(trainer, await create(trainer, job_spec, name), timeout=180)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    assert job.device_plan.strategy == pb.PARALLEL_STRATEGY_DDP
    assert job.output_model_revision.startswith(f"models/dist-{name}/revisions/")


async def test_cancel_stops_every_rank(trainer: Stub, inputs: Inputs) -> None:
    job_spec = spec(
        pb.METHOD_SFT, inputs.base, inputs.sft, tuning=FULL, training=training(2, 100_000),
        resources=TWO_CPUS, output_model="models/dist-never",
    )  # fmt: skip
    name = await create(trainer, job_spec, "cancel")
    request = pb.WatchTrainingJobRequest(name=name)
    async for event in trainer.WatchTrainingJob(request, timeout=180):
        if event.HasField("metrics"):
            break  # both ranks are training
    ranks = {rank_of(p) for p in group_processes(name)}
    assert {0, 1} <= ranks
    await trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=name))
    job = await wait_for(trainer, name, timeout=60)
    assert job.state == pb.TrainingJob.STATE_CANCELLED
    await until(lambda: not group_processes(name), timeout=10, what="every rank exits")


async def test_a_killed_rank_restarts_the_group_from_its_checkpoint(
    trainer: Stub, inputs: Inputs
) -> None:
    """A rank killed without a word (SIGKILL, as the OOM killer does) is what a lone worker's
    SIGKILL is: the supervisor starts the group again from the last checkpoint."""
    steps = pb.TrainingParams(
        max_steps=200, per_device_batch_size=2, max_length=32, log_every=1, save_every=20
    )
    job_spec = spec(
        pb.METHOD_SFT, inputs.base, inputs.sft, tuning=FULL, training=steps,
        resources=TWO_CPUS, output_model="models/dist-rank-killed",
    )  # fmt: skip
    name = await create(trainer, job_spec, "kill")
    request = pb.WatchTrainingJobRequest(name=name)
    async for event in trainer.WatchTrainingJob(request, timeout=180):
        if event.HasField("checkpoint"):
            break
    (rank1,) = [p for p in group_processes(name) if rank_of(p) == 1]
    rank1.send_signal(signal.SIGKILL)
    job = await wait_for(trainer, name, timeout=180)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    events = [e async for e in trainer.WatchTrainingJob(request, timeout=30)]
    logs = [e.log.message for e in events if e.HasField("log")]
    assert "rank 1 was killed by SIGKILL" in logs
    changes = [e.state_change.message for e in events if e.HasField("state_change")]
    assert any("killed by SIGKILL; restarting it from step" in m for m in changes), changes


async def test_a_rank_s_own_error_is_the_job_s_error(trainer: Stub, inputs: Inputs) -> None:
    bad = pb.Tuning(lora=pb.LoraConfig(target_modules=["no_such_proj"]))
    job_spec = spec(
        pb.METHOD_SFT, inputs.base, inputs.sft, tuning=bad, training=training(2),
        resources=TWO_CPUS, output_model="models/dist-bad",
    )  # fmt: skip
    job = await wait_for(trainer, await create(trainer, job_spec, "bad"), timeout=120)
    assert job.state == pb.TrainingJob.STATE_FAILED
    assert job.error.code == code_pb2.INVALID_ARGUMENT, job.error
    assert "no_such_proj not found" in job.error.message and "rank " in job.error.message


async def test_a_group_killed_after_a_checkpoint_restarts_from_it(
    trainer: Stub, inputs: Inputs
) -> None:
    steps = pb.TrainingParams(
        max_steps=200, per_device_batch_size=2, max_length=32, log_every=1, save_every=20
    )
    job_spec = spec(
        pb.METHOD_SFT, inputs.base, inputs.sft, tuning=FULL, training=steps,
        resources=TWO_CPUS, output_model="models/dist-restarted",
    )  # fmt: skip
    name = await create(trainer, job_spec, "restart")
    request = pb.WatchTrainingJobRequest(name=name)
    async for event in trainer.WatchTrainingJob(request, timeout=180):
        if event.HasField("checkpoint"):
            break
    (launcher,) = [p for p in group_processes(name) if rank_of(p) is None]
    launcher.send_signal(signal.SIGKILL)  # the agent: its ranks die with it (PDEATHSIG)
    job = await wait_for(trainer, name, timeout=180)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    events = [e async for e in trainer.WatchTrainingJob(request, timeout=30)]
    changes = [e.state_change.message for e in events if e.HasField("state_change")]
    assert any("restarting it from step" in m for m in changes), changes
    steps_seen = [e.metrics.step for e in events if e.HasField("metrics")]
    assert steps_seen == list(range(1, 201))  # rank 0's, once each: redone steps not again


async def test_a_sigterm_is_a_cancel_only_when_the_trainer_wrote_the_cancel_file(
    tmp_path: Path,
) -> None:
    """A Kubernetes eviction, preemption or drain SIGTERMs the agent (a pod's pid 1) with no
    cancel file: no rank reports a cancel, no cancel file appears, and the agent dies by
    SIGTERM (the supervisor restarts the group from its checkpoint). The trainer's cancel
    writes the file first: an agent starting after it keeps it, and rank 0 reports the cancel."""
    launcher = LocalLauncher("tests.trainer.stopping_worker", lambda: worker_env(os.environ, None))
    plan = {"device_type": "cpu", "devices_per_node": 2}
    evicted, cancelled = tmp_path / "evicted", tmp_path / "cancelled"
    evicted.mkdir()
    cancelled.mkdir()
    (cancelled / CANCEL_FILE).touch()  # as `Workers.stop` writes it before a late pod starts
    groups = {}
    for folder in (evicted, cancelled):
        workers = await launcher.start("j", folder, plan)
        assert isinstance(workers, LocalWorkers)
        groups[folder] = workers.proc
    await until(
        lambda: all((f / f"rank-{r}.ready").exists() for f in groups for r in (0, 1)),
        timeout=120,
        what="both groups' ranks start",
    )
    assert (cancelled / CANCEL_FILE).exists()
    for proc in groups.values():
        proc.send_signal(signal.SIGTERM)  # the agent alone, as the kubelet signals pid 1
    await until(lambda: all(p.poll() is not None for p in groups.values()), timeout=60)
    assert groups[evicted].returncode == -signal.SIGTERM
    assert not (evicted / CANCEL_FILE).exists()
    assert "cancelled" not in event_kinds(evicted)
    assert groups[cancelled].returncode == 0
    assert event_kinds(cancelled) == ["cancelled"]


def event_kinds(folder: Path) -> list[str]:
    lines = (folder / EVENTS_FILE).read_text().splitlines()
    return [json.loads(line)["kind"] for line in lines]


@dataclass
class _Failure:  # what root_cause reads of torchrun's ProcessFailure
    exitcode: int
    timestamp: int = 0  # torchrun's: the second the failures were collected in, all the same


def _rank_error(folder: Path, r: int, message: str) -> None:
    (folder / RANK_ERRORS).mkdir(exist_ok=True)
    (folder / RANK_ERRORS / f"{r}.json").write_text(
        json.dumps({"code": "INTERNAL", "message": message})
    )


def test_a_killed_rank_is_the_root_cause_not_its_peers_connection_error(tmp_path: Path) -> None:
    _rank_error(tmp_path, 0, "rank 0: RuntimeError: Connection closed by peer")
    failures = {0: _Failure(1), 1: _Failure(-signal.SIGKILL)}
    assert root_cause(tmp_path, failures) == ({}, signal.SIGKILL, 1)


def test_a_ranks_own_error_ends_the_job_and_the_ranks_stopped_after_it_do_not(
    tmp_path: Path,
) -> None:
    _rank_error(tmp_path, 1, "rank 1: ValueError: bad")
    failures = {0: _Failure(-signal.SIGTERM), 1: _Failure(1)}  # the agent SIGTERMs rank 0
    error, killed_by, blamed = root_cause(tmp_path, failures)
    assert (error["message"], killed_by, blamed) == ("rank 1: ValueError: bad", 0, 1)
    error, killed_by, blamed = root_cause(tmp_path / "none", {0: _Failure(-15), 1: _Failure(3)})
    assert (error["message"], killed_by, blamed) == (
        "rank 1 exited with code 3; see the worker log",
        0,
        1,
    )
