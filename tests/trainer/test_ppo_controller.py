"""PPO on the online-RL controller, through the in-memory ports of test_rl_controller: the
critic learns the fake task's values while the policy learns to end in GOOD, failed rewards
add nothing, vf_coef changes the update, and a resume restores critic, optimizer and kl_coef."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from services.trainer.domain import Method
from services.trainer.ppo import controller_config, ppo_config
from services.trainer.rl.actor import Actor, build_actor
from services.trainer.rl.batch import Sample, Score, ScoreStatus, Trajectories, make_batch
from services.trainer.rl.controller import Controller, saved_state
from services.trainer.rl.critic import Critic, build_critic
from services.trainer.rl.ppo_learner import PpoLearner
from services.trainer.spec import JobSpec, PpoParams, Sampling, TrainingParams, validate
from services.trainer.worker_protocol import CHECKPOINTS
from tests.trainer.test_rl_controller import (
    BAD,
    BASE,
    GOOD,
    PROMPT,
    FakePrompts,
    FakePublisher,
    FakeSampler,
    FakeScorer,
    Reporter,
    p_token,
    weights,
)

G = 4


def job(**params: Any) -> JobSpec:
    """2 prompts x 4 samples per step; critic at 10x the policy's learning rate."""
    training = TrainingParams(
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        per_device_batch_size=2,
        log_every=1,
        save_every=0,
    )
    values = {"sampling": Sampling(n=G, max_tokens=2), "critic_learning_rate": 1e-2} | params
    spec = JobSpec(
        Method.PPO,
        BASE,
        "datasets/p/revisions/1",
        None,
        evaluator="evaluators/e/revisions/1",
        training=training,
        params=PpoParams(**values),
    )
    return validate(spec)


def models(model_dir: Path, spec: JobSpec) -> tuple[Actor, PpoLearner]:
    actor = build_actor(model_dir, spec, "fp32", "cpu")
    actor.configure_optimizer(spec, "fp32", 100)
    critic = build_critic(model_dir, spec, "fp32", "cpu")
    rate = spec.params.critic_learning_rate
    critic.configure_optimizer(spec, rate, "fp32", 100)
    return actor, PpoLearner(critic, ppo_config(spec))


def make(
    actor: Actor, learner: PpoLearner, spec: JobSpec, folder: Path, steps: int, **kw: Any
) -> tuple[Controller, Reporter, FakePublisher, FakePrompts]:
    prompts, sampler, reporter = FakePrompts(), FakeSampler(), Reporter()
    publisher = FakePublisher(sampler)
    config = replace(controller_config(spec, steps, "t"), **kw)
    controller = Controller(
        config, actor, prompts, sampler, FakeScorer(), publisher, reporter, folder, learner=learner
    )
    return controller, reporter, publisher, prompts


@pytest.mark.slow  # trains the tiny model
async def test_the_critic_learns_and_the_policy_improves(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Half of each prompt's samples end in GOOD (reward 1), half in BAD (0), whatever the
    policy (the fake sampler): after 6 steps of 4 epochs x 2 mini-batches, pi(GOOD) has risen
    and pi(BAD) fallen; the critic's values moved from ~0 to the returns' ~0.5 and its loss
    fell to near the floor of the rewards' own variance (0.5 x 0.25 on each token), the new
    head's explained variance from clearly negative to about 0."""
    spec = job(kl_coef=0.0, num_mini_batches=2)
    actor, learner = models(tiny_model_dir, spec)
    good, bad = p_token(actor, [GOOD]), p_token(actor, [BAD])
    controller, reporter, publisher, _ = make(actor, learner, spec, tmp_path, 6)
    await controller.start()
    await controller.run()
    assert p_token(actor, [GOOD]) > 5 * good and p_token(actor, [BAD]) < bad / 5
    steps = [values for _, values in reporter.metric_events]
    assert len(steps) == 6 and publisher.published == [1, 2, 3, 4, 5, 6]
    first, last = steps[0], steps[-1]
    assert last["value_loss"] < 0.6 * first["value_loss"] and last["value_loss"] < 0.2
    assert abs(last["values_mean"] - 0.5) < abs(first["values_mean"] - 0.5)
    assert first["explained_variance"] < last["explained_variance"]
    expected = {
        "value_loss", "explained_variance", "value_clip_fraction", "returns_mean", "values_mean",
        "approx_kl", "kl", "kl_coef", "loss", "entropy", "clip_ratio/region", "clip_ratio/low",
        "clip_ratio/high", "grad_norm", "learning_rate", "critic_learning_rate",
        "logprob_mismatch", "reward_mean", "valid_fraction", "tokens_per_second",
    }  # fmt: skip
    assert expected <= set(last)
    assert last["learning_rate"] == pytest.approx(1e-3)
    assert last["critic_learning_rate"] == pytest.approx(1e-2)
    assert first["approx_kl"] > 0 and first["value_clip_fraction"] > 0


@pytest.mark.slow  # trains the tiny model
def test_a_failed_reward_adds_nothing(tiny_model_dir: Path) -> None:
    """Samples whose reward is not OK have no token in the mask: zero advantages and returns,
    and the targets of the others are what they are without those samples."""
    spec = job()
    actor, learner = models(tiny_model_dir, spec)
    samples = [
        replace(s, logprobs=[-1.0] * len(s.completion_ids))
        for s in _samples()  # GOOD, BAD, [1, GOOD], [1, BAD]
    ]
    rewards = [1.0, float("nan"), 1.0, 0.0]
    trained = [True, False, True, True]
    t = _trajectories(samples, rewards, trained)
    batch = make_batch(samples, t.valid(), 0)
    targets, _ = learner.targets(actor, batch, t.rewards())
    assert bool(torch.all(targets.advantages[1] == 0)) and bool(torch.all(targets.returns[1] == 0))
    keep = [0, 2, 3]
    alone = _trajectories([samples[i] for i in keep], [rewards[i] for i in keep], [True] * 3)
    alone_batch = make_batch([samples[i] for i in keep], alone.valid(), 0)
    without, _ = learner.targets(actor, alone_batch, alone.rewards())
    width = without.returns.shape[1]
    torch.testing.assert_close(targets.returns[keep][:, :width], without.returns)
    torch.testing.assert_close(targets.advantages[keep][:, :width], without.advantages)


@pytest.mark.slow  # trains the tiny model
def test_vf_coef_changes_the_update(tiny_model_dir: Path) -> None:
    """The gradient norm of policy and critic is clipped together (max_grad_norm 0.01, which
    every step reaches), as TRL's PPO: vf_coef sets the value gradient's share of that norm,
    so each step's clipping factor, which AdamW's moments then mix over the 4 steps. (AdamW
    alone is blind to a constant scale of one model's gradient: the effect is small.)"""
    after = []
    for vf_coef in (0.01, 10.0):
        spec = job(vf_coef=vf_coef, ppo_epochs=2, num_mini_batches=2)
        spec = replace(spec, training=replace(spec.training, max_grad_norm=0.01))
        actor, learner = models(tiny_model_dir, spec)
        samples = _samples()
        t = _trajectories(samples, [1.0, 0.0, 1.0, 0.0], [True] * 4)
        learner.learn(actor, make_batch(samples, t.valid(), 0), t)
        after.append(weights(actor))
    gap = max(float((after[0][n] - w).abs().max()) for n, w in after[1].items())
    assert gap > 1e-5


@pytest.mark.slow  # trains the tiny model
async def test_resume_restores_the_critic_its_optimizer_and_kl_coef(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """save_every 2 of 3 steps, adaptive KL: the resume state at step 2 holds the critic's
    weights and AdamW moments and the adapted kl_coef; a new controller restores them and runs
    step 3 alone."""
    spec = job(kl_coef=0.1, target_kl=0.001, kl_horizon=100)
    actor, learner = models(tiny_model_dir, spec)
    controller, reporter, _, _ = make(actor, learner, spec, tmp_path, 3, save_every=2)
    await controller.start()
    for step in range(2):
        await controller.step(step)
        await controller.publish(step + 1)
    controller.save(2)
    saved, kl_coef = _critic_weights(learner.critic), learner.kl.value
    assert kl_coef != 0.1 and saved_state(tmp_path / CHECKPOINTS) is not None
    assert reporter.checkpoints == [2]

    actor2, learner2 = models(tiny_model_dir, spec)
    assert not _same(_critic_weights(learner2.critic), saved)
    resumed, reporter2, publisher2, prompts2 = make(
        actor2, learner2, spec, tmp_path, 3, save_every=2
    )
    assert await resumed.start() == 2
    assert _same(_critic_weights(learner2.critic), saved)
    assert learner2.kl.value == kl_coef and learner2.batches == 2
    optimizer = learner2.critic.optimizer
    assert optimizer is not None and optimizer.state_dict()["state"]
    await resumed.run()
    assert prompts2.asked == [2] and publisher2.published == [3]
    ((step, values),) = reporter2.metric_events
    assert step == 3 and values["kl_coef"] == pytest.approx(kl_coef)


def _critic_weights(critic: Critic) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in critic.model.named_parameters() if p.requires_grad}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _samples() -> list[Sample]:
    completions = [[GOOD], [BAD], [1, GOOD], [1, BAD]]
    return [Sample(PROMPT, c, [-1.0] * len(c), "", BASE) for c in completions]


def _trajectories(samples: list[Sample], rewards: list[float], trained: list[bool]) -> Trajectories:
    scores = [
        Score(ScoreStatus.OK, r) if ok else Score(ScoreStatus.UNSCORABLE, r)
        for r, ok in zip(rewards, trained, strict=True)
    ]
    return Trajectories([{"prompt": "q"}], samples, scores, len(samples), trained)


def test_the_estimate_counts_the_critic() -> None:
    """Full tuning, fp32 on CPU, a base of 1000 parameters: the critic is a model of the
    base's size trained in full, 4 (weights) + 4 (gradients) + 8 (AdamW) bytes per parameter,
    plus its activations, which have no vocabulary logits (the tiny config's vocab 512 x 4 bytes
    per token is the difference from the policy's)."""
    from services.trainer import resources

    config = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512}
    spec = replace(job(), lora=None)
    estimate = resources.estimate(spec, 1000, config, resources.Devices(0, 0, 10**12))
    policy_activations = estimate.breakdown["activations"]
    tokens = 2 * G * (resources.ROLLOUT_PROMPT_TOKENS + 2)  # B x n, prompt + max_tokens
    critic_activations = policy_activations - tokens * 512 * 4
    assert estimate.breakdown["critic"] == 1000 * 16 + critic_activations
    assert "the critic is assumed the size of the base" in estimate.notes
