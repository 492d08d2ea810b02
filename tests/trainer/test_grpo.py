"""GRPO end to end on the tiny model: the trainer drives rollout and reward in the same server,
pushes a LoRA adapter revision every step, and the rollout service ends up serving it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from services.trainer.domain import Method
from services.trainer.rl.actor import build_actor
from services.trainer.rl.batch import Sample, make_batch
from services.trainer.spec import GrpoParams, JobSpec, LoraParams
from tests.trainer.conftest import Inputs, push_vowels, spec, wait_for, watch
from tests.trainer.test_api import refused
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

pytestmark = pytest.mark.slow
Stub = trainer_pb2_grpc.TrainerServiceStub
LORA = pb.Tuning(lora=pb.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
STEPS, GROUP = 3, 4
# Not 1: the rollout's log-probs must be temperature-scaled to match the trainer's.
TEMPERATURE = 0.7
# GRPO refuses training.max_length (its completions are bounded by sampling.max_tokens).
TRAINING = pb.TrainingParams(max_steps=STEPS, per_device_batch_size=2, log_every=1)


def grpo_spec(inputs: Inputs, evaluator: str) -> pb.TrainingJobSpec:
    return spec(
        pb.METHOD_GRPO,
        inputs.base,
        inputs.prompts,
        evaluator=evaluator,
        tuning=LORA,
        output_model="models/tiny-grpo-e2e",
        training=pb.TrainingParams(
            max_steps=STEPS, per_device_batch_size=2, log_every=1, learning_rate=1e-2, save_every=1
        ),
        grpo=pb.GrpoParams(
            num_generations=GROUP,
            sync_every=1,
            sampling={"max_tokens": 8, "seed": 3, "temperature": TEMPERATURE},
        ),
    )


@pytest.fixture(scope="module")
async def vowels(stack: ServerThread, inputs: Inputs) -> str:
    return await push_vowels(stack, "evaluators/vowels", "grpo-vowels")


async def test_grpo_lora_trains_pushes_policies_and_the_rollout_serves_the_last(
    stack: ServerThread, trainer: Stub, inputs: Inputs, vowels: str, tmp_path: Path
) -> None:
    create = pb.CreateTrainingJobRequest(spec=grpo_spec(inputs, vowels), request_id="e2e-grpo")
    created = await trainer.CreateTrainingJob(create)
    assert created.spec.grpo.beta == pytest.approx(0.04) and created.spec.grpo.loss_type == "grpo"
    assert created.spec.grpo.sampling.n == GROUP and created.spec.evaluator == vowels
    job = await wait_for(trainer, created.name, timeout=240)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    assert job.progress.step == STEPS and job.checkpoint_step == STEPS

    registry = RegistryClient(stack.address)
    try:
        revision = await registry.get_model_revision(job.output_model_revision)
        await registry.download_model_revision(job.output_model_revision, tmp_path)
    finally:
        await registry.close()
    assert revision.format == registry_pb2.MODEL_FORMAT_LORA_ADAPTER
    assert revision.lineage.base_model_revision == inputs.base
    assert list(revision.lineage.dataset_revisions) == [inputs.prompts]
    assert revision.lineage.evaluator_revision == vowels
    assert revision.lineage.training_job == job.name
    weights = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # peft starts lora_B at zero

    events = await watch(trainer, job.name)
    metrics = [e.metrics for e in events if e.HasField("metrics")]
    assert [m.step for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"reward_mean", "reward_std", "valid_fraction", "kl", "loss"} <= set(m.values)
        assert {"clip_ratio/region", "completions/mean_length", "tokens_per_second"} <= set(
            m.values
        )
        assert {"rewards/vowels/mean", "entropy", "time/generate", "time/publish"} <= set(m.values)
        assert m.values["valid_fraction"] == 1.0 and m.values["kl"] >= 0
        # Every step samples right after a sync, at temperature 0.7: the trainer recomputes the
        # sampler's (temperature-scaled) log-probs on the same weights, so the truncated
        # importance ratios pi_old / pi_rollout are 1 (raw log-probs would be off by far more).
        assert m.values["logprob_mismatch"] < 1e-3
        assert m.values["importance_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        assert m.values["importance_ratio_max"] == pytest.approx(1.0, abs=1e-2)
    assert any(m.values["reward_std"] > 0 for m in metrics)  # a learning signal existed
    assert metrics[-1].values["kl"] > 0  # the policy moved away from the reference
    checkpoints = [e.checkpoint for e in events if e.HasField("checkpoint")]
    assert [c.step for c in checkpoints] == [1, 2, 3]
    policies = [c.policy_revision for c in checkpoints]
    assert len(set(policies)) == STEPS and policies[-1] == job.output_model_revision

    channel = grpc.aio.insecure_channel(stack.address)
    try:
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        request = rollout_pb2.GenerateRequest(
            prompts=[common_pb2.Prompt(text="What is 1 + 2?")],
            sampling=rollout_pb2.SamplingParams(max_tokens=2, seed=1),
            adapter_revision=job.output_model_revision,
        )
        completions = [c async for r in rollout.Generate(request) for c in r.completions]
    finally:
        await channel.close()
    assert [c.policy_version for c in completions] == [job.output_model_revision]


async def test_grpo_full_weights_with_dapo_loss_syncs_by_load_model(
    stack: ServerThread,
    trainer: Stub,
    inputs: Inputs,
    vowels: str,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    """Full tuning: a frozen reference copy, mu = 2 updates per batch, a sync every 2 steps
    (so step 1 samples with the base and step 2 still does), and the rollout service ends up
    serving the pushed weights as its model."""
    job_spec = grpo_spec(inputs, vowels)
    job_spec.tuning.CopyFrom(pb.Tuning(full=pb.FullTuning()))
    job_spec.output_model = "models/tiny-grpo-full"
    job_spec.training.max_steps, job_spec.training.save_every = 2, 2
    job_spec.grpo.num_generations, job_spec.grpo.num_iterations = 2, 2
    job_spec.grpo.sync_every, job_spec.grpo.loss_type = 2, "dapo"
    created = await trainer.CreateTrainingJob(pb.CreateTrainingJobRequest(spec=job_spec))
    job = await wait_for(trainer, created.name, timeout=240)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    registry = RegistryClient(stack.address)
    try:
        revision = await registry.get_model_revision(job.output_model_revision)
        await registry.download_model_revision(job.output_model_revision, tmp_path)
    finally:
        await registry.close()
    assert revision.format == registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
    assert revision.lineage.evaluator_revision == vowels
    base, out = (
        load_file(tiny_model_dir / "model.safetensors"),
        load_file(tmp_path / "model.safetensors"),
    )
    assert any(not torch.equal(base[k], out[k]) for k in base if k in out)
    events = await watch(trainer, job.name)
    checkpoints = [e.checkpoint for e in events if e.HasField("checkpoint")]
    assert [(c.step, c.policy_revision) for c in checkpoints] == [(2, job.output_model_revision)]
    metrics = [e.metrics.values for e in events if e.HasField("metrics")]
    assert metrics[1]["kl"] > 0  # step 2's reference is the base, the policy moved at step 1
    assert metrics[1]["logprob_mismatch"] > 0  # ... while the sampler still ran the base
    channel = grpc.aio.insecure_channel(stack.address)
    try:
        rollout = rollout_pb2_grpc.RolloutServiceStub(channel)
        status = await rollout.GetEngineStatus(rollout_pb2.GetEngineStatusRequest())
    finally:
        await channel.close()
    assert status.model_revision == job.output_model_revision


async def test_grpo_needs_a_prompt_dataset_and_an_evaluator(
    trainer: Stub, inputs: Inputs, vowels: str
) -> None:
    on_sft = spec(pb.METHOD_GRPO, inputs.base, inputs.sft, evaluator=vowels, training=TRAINING)
    err, fields, reason = await refused(trainer, on_sft)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason == "DATASET_KIND_MISMATCH"
    assert fields == ["spec.train_dataset"] and "GRPO needs a prompt dataset" in err.details()
    no_evaluator = spec(pb.METHOD_GRPO, inputs.base, inputs.prompts, training=TRAINING)
    err, fields, _ = await refused(trainer, no_evaluator)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and fields == ["spec.evaluator"]
    assert "GRPO needs an evaluator" in err.details()


async def test_grpo_hyperparameters_are_checked_per_field(
    trainer: Stub, inputs: Inputs, vowels: str
) -> None:
    params = pb.GrpoParams(num_generations=1, epsilon=0, loss_type="ppo", sampling={"top_p": 0})
    params.sampling.temperature = 0
    bad = spec(
        pb.METHOD_GRPO,
        inputs.base,
        inputs.prompts,
        evaluator=vowels,
        grpo=params,
        training=TRAINING,
    )
    err, fields, _ = await refused(trainer, bad)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(fields) == {
        "spec.grpo.num_generations",
        "spec.grpo.epsilon",
        "spec.grpo.loss_type",
        "spec.grpo.sampling.temperature",
        "spec.grpo.sampling.top_p",
    }
    defaults = spec(
        pb.METHOD_GRPO, inputs.base, inputs.prompts, evaluator=vowels, training=TRAINING
    )
    defaults.training.ClearField("learning_rate")
    job = await trainer.CreateTrainingJob(
        pb.CreateTrainingJobRequest(spec=defaults, validate_only=True)
    )
    g = job.spec.grpo
    assert (g.num_generations, g.sampling.n, g.num_iterations, g.sync_every) == (8, 8, 1, 1)
    assert (g.beta, g.epsilon, g.scale_rewards, g.loss_type) == (
        pytest.approx(0.04),
        pytest.approx(0.2),
        "group",
        "grpo",
    )
    assert job.spec.training.learning_rate == pytest.approx(1e-5)  # LoRA's online-RL default
    assert job.spec.output_model == "models/tiny-grpo"


BASE = "models/tiny/revisions/1"


def rollout(prompt: list[int], completion: list[int], version: str = BASE) -> Sample:
    return Sample(prompt, completion, [-0.5] * len(completion), "x", version)


def grpo_job(lora: LoraParams | None) -> JobSpec:
    return JobSpec(Method.GRPO, BASE, "datasets/p/revisions/1", lora=lora, params=GrpoParams())


def test_make_batch_right_pads_on_the_policy_device_and_checks_log_probs() -> None:
    """Prompt lengths 2 and 1, completions 1 and 3: (N, L) = (2, 4), (N, T) = (2, 3), the
    second sample unscorable so its tokens are masked; tensors on the device asked for (the
    model's: CUDA in production, where CPU inputs fail)."""
    rollouts = [rollout([5, 6], [7]), rollout([5], [8, 9, 10])]
    batch = make_batch(rollouts, torch.tensor([True, False]), 0, torch.device("meta"))
    for t in (batch.input_ids, batch.attention_mask, batch.sampling_logp, batch.mask):
        assert t.device.type == "meta"
    cpu = make_batch(rollouts, torch.tensor([True, False]), 0)
    assert cpu.input_ids.tolist() == [[5, 6, 7, 0], [5, 8, 9, 10]]
    assert cpu.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert cpu.mask.tolist() == [[1, 0, 0], [0, 0, 0]]
    short = Sample([5], [8, 9], [-0.5], "x", BASE)  # skip_logprobs or a broken engine
    with pytest.raises(RuntimeError, match="1 log-probs for 2 tokens"):
        make_batch([short], torch.tensor([True]), 0)


def test_full_tuning_trains_fp32_master_weights_under_16_bit_autocast(
    tiny_model_dir: Path,
) -> None:
    """16-bit weights round lr-1e-6 updates away: full tuning keeps fp32 weights (and fp32
    gradients) and autocasts; the frozen reference needs no master copy. LoRA keeps its base
    in the compute precision, adapters fp32. (CPU autocast stands in for CUDA here.)"""
    full = build_actor(tiny_model_dir, grpo_job(None), "bf16", "cpu")
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    assert full.reference is not None and full.autocast == torch.bfloat16
    assert {p.dtype for p in full.reference.parameters()} == {torch.bfloat16}
    batch = make_batch([rollout([1, 2, 3], [4, 5]), rollout([1], [6])], torch.ones(2) > 0, 0)
    logp = full.logprobs(batch)  # (2, 2)
    assert logp.shape == (2, 2) and logp.dtype == torch.float32 and bool(torch.all(logp <= 0))
    (logp * batch.mask).sum().backward()
    grads = [p.grad for p in full.model.parameters() if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {torch.float32}
    assert torch.allclose(full.reference_logprobs(batch), logp.detach(), atol=0.1)
    lora = build_actor(
        tiny_model_dir, grpo_job(LoraParams(target_modules=("q_proj",))), "bf16", "cpu"
    )
    trained = {p.dtype for p in lora.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in lora.model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    assert build_actor(tiny_model_dir, grpo_job(None), "fp32", "cpu").autocast is None
