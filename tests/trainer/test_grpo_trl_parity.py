"""Our GRPO equals TRL 1.16's GRPOTrainer on the same batch.

A real `GRPOTrainer` on the tiny Qwen2 model gets fixed completions through its `rollout_func`
(prompt ids, completion ids and the sampler's log-probs) and fixed rewards from a reward
function, and builds its own inputs dict with `_generate_and_score_completions`: advantages, old,
reference and sampler log-probs, importance ratios. Our side starts from the same weights and
the same rollouts and goes through the trainer's own pieces (`make_batch`, `Actor` log-probs at
the temperature, `batch_advantages`, `sampler_correction`, `loss_config`, `algos.policy_loss`). The
loss and every parameter's gradient must agree within 1e-5, for every loss type, with and
without KL and its bias correction, with and without the importance-sampling correction, at
temperature 0.7. TRL computes every expected number itself; nothing of its formulas is copied.

TRL applies its truncated IS correction only with vLLM (`use_vllm`); vLLM is not installed, so
`use_vllm` is switched on after construction, with the rollout function standing in for vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from services.trainer.domain import Method
from services.trainer.grpo import loss_config, objective
from services.trainer.rl import AdvantageEstimator, LossType, ScaleRewards, algos
from services.trainer.rl.actor import Actor, build_actor, sampler_correction
from services.trainer.rl.batch import Sample, TokenBatch, make_batch
from services.trainer.rl.controller import compute_advantages
from services.trainer.spec import GrpoParams, JobSpec, Sampling

pytestmark = pytest.mark.slow
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental

trl = pytest.importorskip("trl")
assert trl.__version__ == "1.16.0", "parity is pinned to TRL 1.16: update this test with TRL"

G, TEMPERATURE, MAX_TOKENS, CAP, TOL = 4, 0.7, 4, 3.0, 1e-5
# Two prompts of different lengths (TRL left-pads them, we right-pad prompt + completion) and
# four completions each, of 1 to 4 tokens.
PROMPTS = [[5, 6, 7, 8], [9, 10]]
COMPLETIONS = [
    [11, 12, 13],
    [14],
    [15, 16],
    [17, 18, 19, 20],
    [21, 22],
    [23, 24, 25, 26],
    [27, 28, 29],
    [30],
]
# The sampler's log-probs: near the tiny model's (about -6.2 on 512 tokens), some far enough
# that pi_old / pi_sampler passes the cap (e^1.5 > 3) or falls well below 1.
SAMPLING = [
    [-6.0 + ((7 * i + 3 * t) % 9 - 4) * 0.4 for t in range(len(c))]
    for i, c in enumerate(COMPLETIONS)
]
REWARDS: list[float | None] = [1.0, 0.0, 0.5, 2.0, 3.0, 1.0, 1.0, 0.0]
LOSS_TYPES = list(LossType)
KL_CASES = [(0.0, False), (0.1, False), (0.1, True)]  # (beta, use_bias_correction_kl)


def rollouts() -> list[Sample]:
    return [Sample(PROMPTS[i // G], c, SAMPLING[i], "", "base") for i, c in enumerate(COMPLETIONS)]


def trl_trainer(
    path: Path, out: Path, rewards: list[float | None], is_correction: bool, **config: Any
) -> Any:
    """A GRPOTrainer in train mode whose generation returns COMPLETIONS and SAMPLING."""

    def rollout_func(prompts: list[Any], trainer: Any) -> dict[str, list[list[Any]]]:
        return {
            "prompt_ids": [r.prompt_ids for r in rollouts()],
            "completion_ids": COMPLETIONS,
            "logprobs": SAMPLING,
        }

    def reward_func(prompts: list[Any], completions: list[Any], **kw: Any) -> list[float | None]:
        return rewards

    args = trl.GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_dropout=True,
        per_device_train_batch_size=len(COMPLETIONS),
        num_generations=G,
        max_completion_length=MAX_TOKENS,
        temperature=TEMPERATURE,
        vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=CAP,
        **config,
    )
    dataset = Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    trainer = trl.GRPOTrainer(
        model=str(path),
        reward_funcs=reward_func,
        args=args,
        train_dataset=dataset,
        rollout_func=rollout_func,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we skip
    if is_correction:  # TRL corrects only vLLM's samples; the rollout function stands in
        trainer.use_vllm = True
        trainer._last_loaded_step = trainer.state.global_step  # no vLLM weights to sync
    return trainer


def generation_batch(trainer: Any) -> dict[str, Any]:
    """TRL's own inputs for `compute_loss`, built from the fixed rollouts and rewards."""
    examples = [{"prompt": "a"}] * G + [{"prompt": "b"}] * G
    return dict(trainer._generate_and_score_completions(examples))


def perturb(model: torch.nn.Module) -> None:
    """Move the policy away from the reference (the base) so that KL and its gradient are not 0."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def our_policy(path: Path, trainer: Any, params: GrpoParams) -> Actor:
    """Full tuning from the same base (our reference), with TRL's perturbed policy weights."""
    spec = JobSpec(
        Method.GRPO, "models/tiny/revisions/1", "datasets/p/revisions/1", None, params=params
    )
    policy = build_actor(path, spec, "fp32", "cpu")
    policy.model.load_state_dict(trainer.model.state_dict())
    return policy


def grpo_params(**kw: Any) -> GrpoParams:
    sampling = Sampling(n=G, temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
    return GrpoParams(num_generations=G, sampling=sampling, importance_sampling_cap=CAP, **kw)


def valid_mask(rewards: list[float | None]) -> torch.Tensor:
    return torch.tensor([r is not None for r in rewards])


def reward_tensor(rewards: list[float | None]) -> torch.Tensor:
    return torch.tensor([r if r is not None else float("nan") for r in rewards])


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=TOL, rtol=0, msg=what)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a, b = gradients(ours), gradients(theirs)
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(a) == set(b) == trainable  # every parameter got a gradient, on both sides
    for name in a:
        close(a[name], b[name], f"gradient of {name}: {{}}")
    assert any(g.abs().max() > 1e-3 for g in a.values())  # a gradient that can disagree


def old_shift(shape: torch.Size) -> torch.Tensor:
    """A fixed offset that takes log pi_old off policy, so ratios leave 1 +- epsilon both ways."""
    steps = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)
    return ((steps * 5) % 7 - 3) * 0.15  # in [-0.45, 0.45]


def batch_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, batch: TokenBatch, params: GrpoParams
) -> torch.Tensor:
    """The controller's advantages for GRPO's settings. (N, T)."""
    options = algos.AdvantageOptions(ScaleRewards(params.scale_rewards))
    return compute_advantages(rewards, valid, G, batch.mask, AdvantageEstimator.GRPO, options)


def our_loss(
    policy: Actor,
    batch: TokenBatch,
    params: GrpoParams,
    rewards: list[float | None],
    old: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """One loss as `Actor.update` computes it on one micro-batch, with log pi_old given."""
    adv = batch_advantages(reward_tensor(rewards), valid_mask(rewards), batch, params)  # (N, T)
    ref = policy.reference_logprobs(batch) if params.beta > 0 else None
    inputs = algos.LossInputs(policy.logprobs(batch), old, adv, batch.mask, ref, weights)
    return algos.policy_loss(inputs, loss_config(params)).loss


@pytest.mark.parametrize("is_correction", [True, False], ids=["is", "no-is"])
@pytest.mark.parametrize(("beta", "bias_correction"), KL_CASES, ids=["beta0", "k3", "k3-corrected"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_every_gradient_equal_trl(
    tiny_model_dir: Path,
    tmp_path: Path,
    loss_type: LossType,
    beta: float,
    bias_correction: bool,
    is_correction: bool,
) -> None:
    trainer = trl_trainer(
        tiny_model_dir,
        tmp_path,
        REWARDS,
        is_correction,
        loss_type=str(loss_type),
        beta=beta,
        use_bias_correction_kl=bias_correction,
        scale_rewards="group",
    )
    perturb(trainer.model)
    inputs = generation_batch(trainer)
    params = grpo_params(
        loss_type=str(loss_type),
        beta=beta,
        use_bias_correction_kl=bias_correction,
        importance_sampling_correction=is_correction,
    )
    policy = our_policy(tiny_model_dir, trainer, params)
    batch = make_batch(rollouts(), valid_mask(REWARDS), 0)

    # The pieces TRL computed before the loss: log pi_old at the temperature (TRL computes it
    # when it corrects), the reference's, the importance ratios, the advantages.
    old = policy.logprobs(batch).detach()  # (N, T)
    weights, _ = sampler_correction(old, batch, objective(params))
    if is_correction:
        close(old, inputs["old_per_token_logps"], "log pi_old: {}")
        assert weights is not None
        close(weights, inputs["importance_sampling_ratio"], "IS ratios: {}")
        assert float(weights.max()) == CAP and float(weights[batch.mask > 0].min()) < 0.9
    else:
        assert weights is None
    if beta > 0:
        close(policy.reference_logprobs(batch), inputs["ref_per_token_logps"], "log pi_ref: {}")
    adv = batch_advantages(reward_tensor(REWARDS), valid_mask(REWARDS), batch, params)  # (N, T)
    close(adv, inputs["advantages"].unsqueeze(1) * batch.mask, "advantages: {}")

    # Off policy, so that clipping bites: the same log pi_old on both sides.
    shifted = old + old_shift(old.shape) * batch.mask
    inputs["old_per_token_logps"] = shifted.clone()
    theirs = trainer.compute_loss(trainer.model, inputs)
    theirs.backward()
    ours = our_loss(policy, batch, params, REWARDS, shifted, weights)
    ours.backward()
    close(ours.detach(), theirs.detach(), "loss: {}")
    assert_same_gradients(policy.model, trainer.model)


# One unscorable sample (None for TRL, not OK for us) and a group whose rewards are all equal.
WITH_UNSCORABLE: list[float | None] = [1.0, 0.0, None, 2.0, 3.0, 3.0, 3.0, 3.0]


@pytest.mark.parametrize("scale", list(ScaleRewards))
def test_advantages_equal_trl_for_every_reward_scaling(
    tiny_model_dir: Path, tmp_path: Path, scale: ScaleRewards
) -> None:
    """TRL leaves a None reward out of its group's mean and std and gives it advantage 0, and
    so do we; std with n - 1 plus 1e-4, per group, over the batch, or none."""
    trainer = trl_trainer(
        tiny_model_dir, tmp_path, WITH_UNSCORABLE, False, scale_rewards=str(scale)
    )
    theirs = generation_batch(trainer)["advantages"]  # (N,)
    ours = algos.group_advantages(
        reward_tensor(WITH_UNSCORABLE), valid_mask(WITH_UNSCORABLE), G, scale
    )
    close(ours, theirs, f"{scale} advantages: {{}}")
    assert theirs[2] == 0 and bool(torch.all(theirs[4:] == 0)) and theirs[1] < 0 < theirs[3]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_an_unscorable_sample_is_as_if_it_were_not_in_the_batch(
    tiny_model_dir: Path, tmp_path: Path, loss_type: LossType
) -> None:
    """Where we differ from TRL, on purpose: TRL keeps an unscorable sample's tokens (advantage
    0, its KL term, a place in every normaliser); we mask them. So our loss on the whole batch
    is TRL's on the batch without that sample, and so is every gradient."""
    trainer = trl_trainer(
        tiny_model_dir,
        tmp_path,
        WITH_UNSCORABLE,
        True,
        loss_type=str(loss_type),
        beta=0.1,
        use_bias_correction_kl=True,
    )
    perturb(trainer.model)
    inputs = generation_batch(trainer)
    keep = valid_mask(WITH_UNSCORABLE)
    n = len(COMPLETIONS)
    without = {
        k: v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
        for k, v in inputs.items()
    }
    without["num_items_in_batch"] = without["completion_mask"].sum()  # DAPO's token count
    theirs = trainer.compute_loss(trainer.model, without)
    theirs.backward()

    params = grpo_params(loss_type=str(loss_type), beta=0.1)
    policy = our_policy(tiny_model_dir, trainer, params)
    batch = make_batch(rollouts(), keep, 0)
    assert float(batch.mask[2].sum()) == 0  # the unscorable sample is masked out
    old = policy.logprobs(batch).detach()
    weights, _ = sampler_correction(old, batch, objective(params))
    ours = our_loss(policy, batch, params, WITH_UNSCORABLE, old, weights)
    ours.backward()
    close(ours.detach(), theirs.detach(), "loss: {}")
    assert_same_gradients(policy.model, trainer.model)


def test_the_correction_is_accepted_at_any_sampling_temperature() -> None:
    """GRPO asks the rollout service for temperature-scaled log-probs (LOGPROBS_MODE_
    TEMPERATURE_SCALED) when the correction is on, so at 0.7 they are pi_sampler as the trainer
    computes it: the correction is accepted on or off, at 0.7 as at 1. (That the rollout's
    numbers then match the trainer's: tests/trainer/test_grpo.py.)"""
    at_07 = grpo_params()  # importance_sampling_correction defaults to true
    assert at_07.sampling.temperature == TEMPERATURE != 1
    assert at_07.importance_sampling_correction and at_07.violations("spec.grpo") == []
    assert objective(at_07).is_correction
    assert grpo_params(importance_sampling_correction=False).violations("spec.grpo") == []
    at_1 = GrpoParams(num_generations=G, sampling=Sampling(n=G, max_tokens=MAX_TOKENS))
    assert at_1.violations("spec.grpo") == []
