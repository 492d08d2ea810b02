"""End to end on a tiny model: jobs of every implemented method through a real server, with
registry, reward and rollout in the same process. All jobs are created up front (two worker
slots) and each test follows its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
from google.rpc import code_pb2
from safetensors.torch import load_file

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from tests.trainer.conftest import Inputs, spec, start_trainer, wait_for, watch
from tlm.registry.v1 import registry_pb2
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
Stub = trainer_pb2_grpc.TrainerServiceStub
FULL = pb.Tuning(full=pb.FullTuning())
LORA = pb.Tuning(lora=pb.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))


def specs(i: Inputs) -> dict[str, pb.TrainingJobSpec]:
    long_run = pb.TrainingParams(
        max_steps=100_000, per_device_batch_size=2, max_length=32, log_every=1, save_every=0
    )
    return {
        "sft_full": spec(
            pb.METHOD_SFT,
            i.base,
            i.sft,
            tuning=FULL,
            output_model="models/tiny-sft-full",
            training=pb.TrainingParams(
                max_steps=4,
                per_device_batch_size=2,
                max_length=32,
                log_every=1,
                save_every=2,
                learning_rate=1e-3,
            ),
        ),
        "sft_lora_chat": spec(pb.METHOD_SFT, i.base, i.chat, tuning=LORA, eval_dataset=i.chat),
        "dpo": spec(pb.METHOD_DPO, i.base, i.preference, tuning=FULL, dpo=pb.DpoParams(beta=0.2)),
        "kto": spec(pb.METHOD_KTO, i.base, i.unpaired, tuning=LORA),
        "reward_model": spec(pb.METHOD_REWARD_MODEL, i.base, i.preference, tuning=LORA),
        "evaluate": spec(
            pb.METHOD_EVALUATE,
            i.base,
            "",
            eval_dataset=i.prompts,
            evaluator=i.evaluator,
            evaluate=pb.EvaluateParams(sampling={"n": 2, "max_tokens": 4, "seed": 1}),
            training=pb.TrainingParams(),  # EVALUATE trains nothing: training fields are refused
        ),
        "bad_modules": spec(
            pb.METHOD_SFT,
            i.base,
            i.sft,
            tuning=pb.Tuning(lora=pb.LoraConfig(target_modules=["no_such_proj"])),
        ),
        "cancel": spec(
            pb.METHOD_SFT, i.base, i.sft, training=long_run, output_model="models/never"
        ),
    }


@pytest.fixture(scope="session")
async def jobs(trainer: Stub, inputs: Inputs) -> dict[str, str]:
    names = {}
    for key, job_spec in specs(inputs).items():
        request = pb.CreateTrainingJobRequest(spec=job_spec, request_id=f"e2e-{key}")
        names[key] = (await trainer.CreateTrainingJob(request)).name
    return names


async def download(address: str, name: str, dest: Path) -> registry_pb2.ModelRevision:
    registry = RegistryClient(address)
    try:
        revision = await registry.get_model_revision(name)
        await registry.download_model_revision(name, dest)
        return revision
    finally:
        await registry.close()


async def succeeded(trainer: Stub, name: str) -> pb.TrainingJob:
    job = await wait_for(trainer, name, timeout=240)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    return job


def changed(base_dir: Path, out_dir: Path, file: str = "model.safetensors") -> list[str]:
    """Names of base tensors whose values differ in the output."""
    base, out = load_file(base_dir / "model.safetensors"), load_file(out_dir / file)
    common = [k for k in base if k in out]
    assert common
    return [k for k in common if not torch.equal(base[k], out[k])]


async def test_sft_full_succeeds_with_lineage_changed_weights_and_ordered_events(
    stack: ServerThread,
    trainer: Stub,
    jobs: dict[str, str],
    inputs: Inputs,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    name = jobs["sft_full"]
    again = await trainer.CreateTrainingJob(
        pb.CreateTrainingJobRequest(spec=specs(inputs)["sft_full"], request_id="e2e-sft_full")
    )
    assert again.name == name  # idempotent by request_id
    job = await succeeded(trainer, name)
    assert job.progress.step == 4 and job.progress.total_steps == 4
    assert job.checkpoint_step == 4 and "train_loss" in job.final_metrics
    assert job.output_model_revision.startswith("models/tiny-sft-full/revisions/")
    revision = await download(stack.address, job.output_model_revision, tmp_path)
    assert revision.format == registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
    assert revision.lineage.base_model_revision == inputs.base
    assert list(revision.lineage.dataset_revisions) == [inputs.sft]
    assert revision.lineage.training_job == name
    assert changed(tiny_model_dir, tmp_path)

    events = await watch(trainer, name)
    assert [e.sequence for e in events] == list(range(len(events)))
    kinds = [e.WhichOneof("event") for e in events]
    states = [e.state_change.state for e in events if e.HasField("state_change")]
    assert states == [
        pb.TrainingJob.STATE_PENDING,
        pb.TrainingJob.STATE_RUNNING,
        pb.TrainingJob.STATE_SUCCEEDED,
    ]
    steps = [e.metrics.step for e in events if e.HasField("metrics")]
    assert steps == [1, 2, 3, 4]
    assert {"loss", "learning_rate", "grad_norm"} <= set(
        events[kinds.index("metrics")].metrics.values
    )
    assert [e.checkpoint.step for e in events if e.HasField("checkpoint")] == [2, 4]
    assert kinds[-2:] == ["result", "state_change"]
    assert events[-2].result.output_model_revision == job.output_model_revision
    tail = await watch(trainer, name, start=len(events) - 1)
    assert [e.sequence for e in tail] == [len(events) - 1]


async def test_sft_lora_on_chat_rows_pushes_an_adapter_on_the_base(
    stack: ServerThread, trainer: Stub, jobs: dict[str, str], inputs: Inputs, tmp_path: Path
) -> None:
    job = await succeeded(trainer, jobs["sft_lora_chat"])
    assert job.output_model_revision.startswith("models/tiny-sft/revisions/")
    assert job.spec.tuning.lora.r == 4 and job.spec.training.lr_scheduler == "cosine"
    assert any(k.startswith("eval_") for k in job.final_metrics)
    revision = await download(stack.address, job.output_model_revision, tmp_path)
    assert revision.format == registry_pb2.MODEL_FORMAT_LORA_ADAPTER
    assert revision.lineage.base_model_revision == inputs.base
    assert list(revision.lineage.dataset_revisions) == [inputs.chat, inputs.chat]
    weights = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # peft starts lora_B at zero


async def test_dpo_full_changes_the_policy(
    stack: ServerThread, trainer: Stub, jobs: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    job = await succeeded(trainer, jobs["dpo"])
    assert job.spec.dpo.beta == pytest.approx(0.2) and job.spec.dpo.loss_type == "sigmoid"
    await download(stack.address, job.output_model_revision, tmp_path)
    assert changed(tiny_model_dir, tmp_path)


async def test_kto_lora_trains(
    stack: ServerThread, trainer: Stub, jobs: dict[str, str], tmp_path: Path
) -> None:
    job = await succeeded(trainer, jobs["kto"])
    await download(stack.address, job.output_model_revision, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


async def test_reward_model_is_a_merged_sequence_classifier(
    stack: ServerThread, trainer: Stub, jobs: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    job = await succeeded(trainer, jobs["reward_model"])
    revision = await download(stack.address, job.output_model_revision, tmp_path)
    assert revision.format == registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 1
    assert changed(tiny_model_dir, tmp_path)


async def test_evaluate_reports_reward_metrics_and_no_model(
    trainer: Stub, jobs: dict[str, str]
) -> None:
    job = await succeeded(trainer, jobs["evaluate"])
    metrics = job.final_metrics
    assert job.output_model_revision == ""
    assert metrics["num_samples"] == 8  # 4 prompts x n=2
    assert metrics["status_ok"] + metrics["status_error"] + metrics["status_unscorable"] == 8
    assert 0 <= metrics["pass_rate"] <= 1 and "reward_mean" in metrics and "reward_std" in metrics


async def test_a_worker_error_fails_the_job_with_a_status(
    trainer: Stub, jobs: dict[str, str]
) -> None:
    job = await wait_for(trainer, jobs["bad_modules"], timeout=240)
    assert job.state == pb.TrainingJob.STATE_FAILED
    assert job.error.code == code_pb2.INVALID_ARGUMENT  # the user's typo, not INTERNAL
    assert "spec.tuning.lora.target_modules" in job.error.message
    assert "no_such_proj" in job.error.message


async def test_another_team_cannot_see_or_touch_a_job(
    stack: ServerThread, inputs: Inputs, tmp_path: Path
) -> None:
    """A trainer with API keys (keyless mode serves every caller as `dev`); its registry is the
    keyless stack's, so the inputs resolve for either team. The job sleeps until cancelled."""
    from tests.conftest import API_KEYS

    keyed = start_trainer(
        tmp_path, stack.address, "tests.trainer.scripted_worker",
        insecure_dev=False, api_keys=API_KEYS, service_api_key="key-service",
    )  # fmt: skip
    owner = (("authorization", "Bearer key-team-a"),)
    other = (("authorization", "Bearer key-team-b"),)
    channel = grpc.aio.insecure_channel(keyed.address)
    try:
        trainer = Stub(channel)
        request = pb.CreateTrainingJobRequest(spec=spec(pb.METHOD_SFT, inputs.base, inputs.sft))
        name = (await trainer.CreateTrainingJob(request, metadata=owner)).name
        calls = (
            trainer.GetTrainingJob(pb.GetTrainingJobRequest(name=name), metadata=other),
            trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=name), metadata=other),
            watch_as(trainer, name, other),
        )
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await trainer.ListTrainingJobs(pb.ListTrainingJobsRequest(), metadata=other)
        assert name not in [j.name for j in listed.jobs]
        get = pb.GetTrainingJobRequest(name=name)
        assert (await trainer.GetTrainingJob(get, metadata=owner)).name == name
        await trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=name), metadata=owner)
    finally:
        await channel.close()
        keyed.stop()


async def watch_as(trainer: Stub, name: str, metadata: tuple[tuple[str, str], ...]) -> None:
    request = pb.WatchTrainingJobRequest(name=name)
    async for _ in trainer.WatchTrainingJob(request, metadata=metadata, timeout=30):
        pass


async def test_list_filters_and_pages(trainer: Stub, jobs: dict[str, str]) -> None:
    page = await trainer.ListTrainingJobs(pb.ListTrainingJobsRequest(page_size=3))
    seen = [j.name for j in page.jobs]
    while page.next_page_token:
        page = await trainer.ListTrainingJobs(
            pb.ListTrainingJobsRequest(page_size=3, page_token=page.next_page_token)
        )
        seen += [j.name for j in page.jobs]
    assert set(jobs.values()) <= set(seen) and len(seen) == len(set(seen))
    assert seen.index(jobs["cancel"]) < seen.index(jobs["sft_full"])  # newest first
    # Other modules share this trainer: the filter keeps only DPO jobs, this module's among them.
    dpo = await trainer.ListTrainingJobs(pb.ListTrainingJobsRequest(method=pb.METHOD_DPO))
    assert jobs["dpo"] in [j.name for j in dpo.jobs]
    assert {j.spec.method for j in dpo.jobs} == {pb.METHOD_DPO}
    assert len(dpo.jobs) < len(seen)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.ListTrainingJobs(
            pb.ListTrainingJobsRequest(method=pb.METHOD_KTO, page_token=page.next_page_token or "x")
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_a_running_job_ends_cancelled(trainer: Stub, jobs: dict[str, str]) -> None:
    name = jobs["cancel"]
    request = pb.WatchTrainingJobRequest(name=name)
    async for event in trainer.WatchTrainingJob(request, timeout=240):
        if event.HasField("metrics"):
            break  # training is under way
    job = await trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=name))
    assert job.state in (pb.TrainingJob.STATE_CANCELLING, pb.TrainingJob.STATE_CANCELLED)
    job = await wait_for(trainer, name, timeout=60)
    assert job.state == pb.TrainingJob.STATE_CANCELLED and job.output_model_revision == ""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await trainer.CancelTrainingJob(pb.CancelTrainingJobRequest(name=name))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_crashing_worker_fails_the_job_and_the_service_keeps_serving(
    stack: ServerThread, inputs: Inputs, tmp_path: Path
) -> None:
    crashing = start_trainer(tmp_path, stack.address, "tests.trainer.crash_worker")
    try:
        channel = grpc.aio.insecure_channel(crashing.address)
        stub = Stub(channel)
        create = pb.CreateTrainingJobRequest(spec=spec(pb.METHOD_SFT, inputs.base, inputs.sft))
        job = await wait_for(stub, (await stub.CreateTrainingJob(create)).name, timeout=60)
        assert job.state == pb.TrainingJob.STATE_FAILED
        assert "exit code 3" in job.error.message
        events = await watch(stub, job.name)
        assert any(e.log.message == "about to crash" for e in events)
        second = await stub.CreateTrainingJob(create)  # still serving
        assert second.state == pb.TrainingJob.STATE_PENDING and second.name != job.name
        await asyncio.sleep(0)
        await channel.close()
    finally:
        crashing.stop()
