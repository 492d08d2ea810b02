"""Device plans through the real server: what `EstimateResources` and `CreateTrainingJob` say
about multi-device plans on this trainer (its CPU cores are its devices when it has no GPU)."""

from __future__ import annotations

import os

import grpc
import pytest
import torch

from tests.trainer.conftest import Inputs, spec
from tests.trainer.test_api import refused
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

Stub = trainer_pb2_grpc.TrainerServiceStub
CORES = os.cpu_count() or 1
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="plans a CPU-only trainer")


def cpu_plan(processes: int, **fields: object) -> pb.Resources:
    plan = pb.DevicePlan(device_type=pb.DEVICE_TYPE_CPU, devices_per_node=processes, **fields)
    return pb.Resources(explicit=plan)


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores for a 2-process plan")
async def test_an_explicit_two_process_cpu_plan_is_ddp_and_says_why(
    trainer: Stub, inputs: Inputs
) -> None:
    full = pb.Tuning(full=pb.FullTuning())
    job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft, tuning=full, resources=cpu_plan(2))
    e = await trainer.EstimateResources(pb.EstimateResourcesRequest(spec=job_spec))
    assert (e.plan.devices_per_node, e.plan.strategy) == (2, pb.PARALLEL_STRATEGY_DDP)
    assert any(n.startswith("DDP over 2 devices: a full replica on each") for n in e.notes)
    # Two processes share the host's memory: each gets half of it in `fits`.
    assert e.fits and e.memory_per_device_bytes == sum(e.memory_breakdown_bytes.values())


async def test_an_auto_plan_on_cpu_is_one_process(trainer: Stub, inputs: Inputs) -> None:
    e = await trainer.EstimateResources(
        pb.EstimateResourcesRequest(spec=spec(pb.METHOD_SFT, inputs.base, inputs.sft))
    )
    assert (e.plan.devices_per_node, e.plan.num_nodes) == (1, 1)
    assert e.plan.strategy == pb.PARALLEL_STRATEGY_SINGLE_DEVICE


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        (cpu_plan(CORES + 1), "devices_per_node"),
        (cpu_plan(1, num_nodes=2), "num_nodes"),
        (cpu_plan(2, strategy=pb.PARALLEL_STRATEGY_FSDP), "strategy"),
        (cpu_plan(1, cpu_offload=True), "cpu_offload"),
    ],
)
async def test_a_plan_this_trainer_cannot_run_is_refused_naming_the_field(
    trainer: Stub, inputs: Inputs, resources: pb.Resources, field: str
) -> None:
    if resources.explicit.devices_per_node > CORES and field != "devices_per_node":
        pytest.skip("needs more cores")
    job_spec = spec(pb.METHOD_SFT, inputs.base, inputs.sft, resources=resources)
    err, fields, _ = await refused(trainer, job_spec)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert fields == [f"spec.resources.explicit.{field}"]
