"""RLOO and REINFORCE++ as advantage estimators of the online-RL engine: their math on numbers
worked out by hand (masking, one-sample groups, the KL penalty in the reward), an invariant, the
contract's validation (a field an estimator ignores is refused by name), the recipe's mapping,
the CLI flag, and the controller training with each on a real tiny model. Learning the demo task
through the services is tests/trainer/test_rl_estimators_learn.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from services.cli.job_spec import build_spec
from services.cli.trainer_cmds import jobs_app
from services.common.errors import InvalidArgument
from services.trainer import grpo
from services.trainer.domain import Method
from services.trainer.rl import AdvantageEstimator, KlEstimator, ScaleRewards, algos
from services.trainer.rl.controller import Controller
from services.trainer.spec import GrpoParams, JobSpec, Sampling, TrainingParams, validate
from tests.trainer.test_rl_controller import (
    BAD,
    GOOD,
    FakePrompts,
    FakePublisher,
    FakeSampler,
    FakeScorer,
    Reporter,
    actor,
    p_token,
)
from tlm.trainer.v1 import trainer_pb2 as pb

BASE = "models/tiny/revisions/r1"
DATA = "datasets/d/revisions/r1"
EVALUATOR = "evaluators/e/revisions/r1"
NAN = float("nan")


def inputs(
    rewards: list[float],
    valid: list[bool],
    group_size: int,
    mask: list[list[float]],
    kl: list[list[float]] | None = None,
) -> algos.AdvantageInputs:
    return algos.AdvantageInputs(
        torch.tensor(rewards),
        torch.tensor(valid),
        group_size,
        torch.tensor(mask),
        kl=torch.tensor(kl) if kl is not None else None,
    )


def rloo(x: algos.AdvantageInputs, kl_coef: float = 0.0) -> list[list[float]]:
    return algos.rloo_advantages(x, algos.AdvantageOptions(kl_coef=kl_coef)).tolist()


def reinforce_pp(x: algos.AdvantageInputs, kl_coef: float = 0.0) -> list[list[float]]:
    return algos.reinforce_pp_advantages(x, algos.AdvantageOptions(kl_coef=kl_coef)).tolist()


def approx(rows: list[list[float]]) -> object:
    return [pytest.approx(row, abs=1e-5) for row in rows]


# RLOO -------------------------------------------------------------------------------------


def test_rloo_subtracts_the_mean_of_the_other_samples() -> None:
    """Group [1, 0, 0, 1]: sample 0's baseline is (0 + 0 + 1) / 3 = 1/3, so A = 2/3; sample 1's
    is (1 + 0 + 1) / 3 = 2/3, so A = -2/3 (= n / (n - 1) x (r - mean) = 4/3 x +-1/2). Every loss
    token of a sample carries its advantage; padding (mask 0) carries 0."""
    x = inputs([1.0, 0, 0, 1], [True] * 4, 4, [[1, 1], [1, 0], [1, 1], [1, 0]])
    a = 2 / 3
    assert rloo(x) == approx([[a, a], [-a, 0], [-a, -a], [a, 0]])
    assert algos.ADVANTAGE_ESTIMATORS[AdvantageEstimator.RLOO] is algos.rloo_advantages


def test_rloo_leaves_samples_that_are_not_ok_out_and_a_lone_ok_sample_at_zero() -> None:
    """Group 1: [1, 0, 0.5, not OK (NaN)]: the baselines are over the 3 OK samples:
    1 - (0 + 0.5) / 2 = 0.75, 0 - (1 + 0.5) / 2 = -0.75, 0.5 - (1 + 0) / 2 = 0; the NaN is never
    read. Group 2: [2, not OK, not OK, not OK]: one OK sample has no baseline: 0."""
    x = inputs(
        [1.0, 0, 0.5, NAN, 2.0, NAN, NAN, NAN],
        [True, True, True, False, True, False, False, False],
        4,
        [[1.0], [1], [1], [0], [1], [0], [0], [0]],
    )
    assert rloo(x) == approx([[0.75], [-0.75], [0.0], [0.0], [0.0], [0.0], [0.0], [0.0]])


def test_rloo_puts_the_summed_kl_in_each_sample_reward() -> None:
    """beta 0.1; rewards [1, 0]; KL_t [[0.5, 0.5], [1.0, 7.0]] where sample 1's second token is
    padding (its 7 is not read): R = [1 - 0.1 x 1.0, 0 - 0.1 x 1.0] = [0.9, -0.1], so
    A = [0.9 - (-0.1), -0.1 - 0.9] = [1, -1]. Without the KL it would be [1, -1] too here, so a
    second case: KL [[2, 2], [0, 7]] gives R = [0.6, 0] and A = [0.6, -0.6]."""
    mask = [[1.0, 1.0], [1.0, 0.0]]
    x = inputs([1.0, 0.0], [True, True], 2, mask, kl=[[0.5, 0.5], [1.0, 7.0]])
    assert rloo(x, 0.1) == approx([[1.0, 1.0], [-1.0, 0.0]])
    x = inputs([1.0, 0.0], [True, True], 2, mask, kl=[[2.0, 2.0], [0.0, 7.0]])
    assert rloo(x, 0.1) == approx([[0.6, 0.6], [-0.6, 0.0]])
    with pytest.raises(ValueError, match="KL estimates"):
        rloo(inputs([1.0, 0.0], [True, True], 2, mask), 0.1)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 6).flatmap(
        lambda g: st.tuples(
            st.just(g),
            st.lists(
                st.tuples(st.floats(-10, 10), st.booleans()), min_size=g, max_size=4 * g
            ).filter(lambda xs: len(xs) % g == 0),
        )
    )
)
def test_rloo_advantages_of_a_group_sum_to_zero(case: tuple[int, list[tuple[float, bool]]]) -> None:
    """Sum_i (r_i - (S - r_i) / (n - 1)) = S - (n S - S) / (n - 1) = 0 over a group's n >= 2 OK
    samples; the others get 0, and every sample of a group with < 2 OK samples gets 0."""
    g, samples = case
    rewards = torch.tensor([r if ok else NAN for r, ok in samples])
    valid = torch.tensor([ok for _, ok in samples])
    adv = algos.leave_one_out_advantages(rewards, valid, g)
    assert torch.isfinite(adv).all()
    for b in range(len(samples) // g):
        group, ok = adv[b * g : b * g + g], valid[b * g : b * g + g]
        assert float(group[~ok].abs().sum()) == 0.0
        if int(ok.sum()) < 2:
            assert float(group.abs().sum()) == 0.0
        else:
            assert float(group[ok].sum()) == pytest.approx(0.0, abs=1e-4)


# REINFORCE++ ------------------------------------------------------------------------------


def test_reinforce_pp_whitens_group_centred_returns_over_the_batch() -> None:
    """beta 0, two groups of 2, two tokens each. Rewards [1, 0 | 0, 0] -> r - mean(group) =
    [0.5, -0.5 | 0, 0] on the last token; returns-to-go put it on both tokens:
    [[.5, .5], [-.5, -.5], [0, 0], [0, 0]]. Over the 8 tokens: mean 0, variance 4 x 0.25 / 8 =
    0.125, std 0.353553 -> +-0.5 / 0.353553 = +-1.414214; the flat group keeps 0 but counts in
    the statistics (unlike GRPO's per-group std)."""
    x = inputs([1.0, 0, 0, 0], [True] * 4, 2, [[1.0, 1.0]] * 4)
    s = 0.5 / math.sqrt(0.125)
    assert reinforce_pp(x) == approx([[s, s], [-s, -s], [0, 0], [0, 0]])
    assert algos.ADVANTAGE_ESTIMATORS[AdvantageEstimator.REINFORCE_PP] is (
        algos.reinforce_pp_advantages
    )


def test_reinforce_pp_kl_per_token_in_the_reward_with_masking_and_lengths() -> None:
    """One group of 3, beta 0.1. Sample 0 (reward 1, two tokens, KL_t [1, 1]); sample 1
    (reward 0, one token: its second is padding with KL 5, not read); sample 2 not OK (NaN,
    tokens masked; its KL 9 is not read). Group mean over OK = 0.5, so r - mean = [0.5, -0.5].
    Token rewards: sample 0 [-0.1, 0.5 - 0.1] = [-0.1, 0.4]; sample 1 [-0.5] (its last token is
    t = 0). Returns-to-go: [0.3, 0.4] and [-0.5]. Whitening over these 3 tokens: mean 0.2 / 3 =
    0.066667, deviations [0.233333, 0.333333, -0.566667], variance 0.486667 / 3 = 0.162222,
    std 0.402768 -> [0.579324, 0.827606, -1.406930]."""
    x = inputs(
        [1.0, 0.0, NAN],
        [True, True, False],
        3,
        [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]],
        kl=[[1.0, 1.0], [0.0, 5.0], [9.0, 9.0]],
    )
    assert reinforce_pp(x, 0.1) == approx([[0.579324, 0.827606], [-1.406930, 0.0], [0.0, 0.0]])


def test_reinforce_pp_a_lone_ok_sample_has_no_baseline_signal_but_counts() -> None:
    """beta 0, one token each. Group 1: [1, not OK]: r - mean = 0 for the lone OK sample;
    group 2: [1, 0] -> [0.5, -0.5]. Whitened over the 3 OK tokens [0, 0.5, -0.5]: mean 0,
    variance 0.5 / 3, std 0.408248 -> [0, 1.224745, -1.224745]; the masked sample stays 0."""
    x = inputs([1.0, NAN, 1.0, 0.0], [True, False, True, True], 2, [[1.0], [0.0], [1.0], [1.0]])
    s = 0.5 / math.sqrt(0.5 / 3)
    assert reinforce_pp(x) == approx([[0.0], [0.0], [s], [-s]])


def test_k2_and_the_returns_and_whitening_helpers() -> None:
    """k2 = (log pi - log pi_ref)^2 / 2: (-1 - -3)^2 / 2 = 2 (mask 0 -> 0); returns-to-go
    [1, 2, 3] -> [6, 5, 3]; a batch of equal returns whitens to 0, not 0 / 0."""
    k2 = algos.KL_ESTIMATORS[KlEstimator.K2]
    out = k2(torch.tensor([[-1.0, 0.0]]), torch.tensor([[-3.0, -5.0]]), torch.tensor([[1.0, 0]]))
    assert out.tolist() == [[2.0, 0.0]]
    assert algos.returns_to_go(torch.tensor([[1.0, 2, 3]])).tolist() == [[6.0, 5.0, 3.0]]
    assert algos.whiten(torch.full((2, 2), 0.7), torch.ones(2, 2)).abs().max() == 0


# Contract ---------------------------------------------------------------------------------


def grpo_job(**params: Any) -> JobSpec:
    return JobSpec(Method.GRPO, BASE, DATA, evaluator=EVALUATOR, params=GrpoParams(**params))


def refused(job: JobSpec) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as err:
        validate(job)
    return {v.field: v.description for v in err.value.violations}


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_each_estimator_accepts_the_fields_it_reads(estimator: str) -> None:
    job = validate(
        grpo_job(
            advantage_estimator=estimator,
            kl_estimator="k2",
            beta=0.05,
            loss_type="dapo",
            epsilon=0.3,
            num_iterations=2,
        )
    )
    assert job.params.advantage_estimator == estimator and job.params.kl_estimator == "k2"
    # The filled-in spec round-trips, as validate_only shows it.
    assert validate(JobSpec.from_dict(job.to_dict())) == job


def test_a_field_the_estimator_ignores_is_refused_by_name() -> None:
    """scale_rewards is GRPO's; RLOO and REINFORCE++ have no KL in the loss, so no bias
    correction; kl_estimator is the reward's KL (not GRPO's, not with beta 0)."""
    problems = refused(grpo_job(advantage_estimator="rloo", scale_rewards="batch"))
    assert list(problems) == ["spec.grpo.scale_rewards"]
    assert "advantage_estimator grpo only" in problems["spec.grpo.scale_rewards"]
    problems = refused(grpo_job(advantage_estimator="reinforce_pp", use_bias_correction_kl=False))
    assert list(problems) == ["spec.grpo.use_bias_correction_kl"]
    assert list(refused(grpo_job(kl_estimator="k2"))) == ["spec.grpo.kl_estimator"]
    job = grpo_job(advantage_estimator="rloo", kl_estimator="k2", beta=0.0)
    assert list(refused(job)) == ["spec.grpo.kl_estimator"]


def test_unknown_estimators_are_refused_with_the_choices() -> None:
    assert refused(grpo_job(advantage_estimator="ppo")) == {
        "spec.grpo.advantage_estimator": "must be one of grpo, rloo, reinforce_pp"
    }
    assert refused(grpo_job(advantage_estimator="rloo", kl_estimator="k3")) == {
        "spec.grpo.kl_estimator": "must be one of k1, k2 (GRPO's KL in the loss is k3)"
    }


def test_the_recipe_moves_beta_into_the_reward_for_rloo_and_reinforce_pp() -> None:
    spec = validate(grpo_job(advantage_estimator="reinforce_pp", beta=0.05, kl_estimator="k2"))
    config = grpo.controller_config(spec, 3, "jobs/j")
    assert config.advantage is AdvantageEstimator.REINFORCE_PP
    assert config.kl_in_reward == 0.05 and config.kl_estimator is KlEstimator.K2
    assert config.objective.loss.beta == 0.0  # nothing in the loss
    spec = validate(grpo_job(beta=0.05))
    config = grpo.controller_config(spec, 3, "jobs/j")
    assert config.advantage is AdvantageEstimator.GRPO and config.kl_in_reward == 0.0
    assert config.objective.loss.beta == 0.05 and config.scale_rewards is ScaleRewards.GROUP


def test_cli_flags_set_the_estimator() -> None:
    flags = {"base_model": "tiny", "dataset": "d", "advantage_estimator": "rloo"}
    spec = build_spec(None, "grpo", flags | {"kl_estimator": "k2"})
    assert spec.grpo.advantage_estimator == "rloo" and spec.grpo.kl_estimator == "k2"
    help_text = CliRunner().invoke(jobs_app, ["create", "--help"], env={"COLUMNS": "200"}).output
    assert "--advantage-estimator" in help_text and "--kl-estimator" in help_text
    assert pb.GrpoParams(advantage_estimator="reinforce_pp").advantage_estimator


# The controller with each estimator --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
async def test_the_controller_trains_with_the_kl_in_the_reward(
    tiny_model_dir: Path, tmp_path: Path, estimator: str
) -> None:
    """The fake sampler's groups end half in GOOD (reward 1), half in BAD (0): after 4 steps with
    the estimator, beta 0.05 in the reward (k2) and two micro-batches per step, pi(GOOD) has
    risen and pi(BAD) fallen. The `kl` metric is the reward's: 0 at step 1 (the policy is the
    reference), then > 0."""
    params = GrpoParams(
        num_generations=4,
        sampling=Sampling(n=4, max_tokens=2),
        beta=0.05,
        advantage_estimator=estimator,
        kl_estimator="k2",
        importance_sampling_correction=False,
    )
    training = TrainingParams(
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        per_device_batch_size=1,
        gradient_accumulation_steps=2,
        log_every=1,
        save_every=0,
    )
    spec = JobSpec(Method.GRPO, BASE, DATA, None, training=training, params=params)
    a = actor(tiny_model_dir, spec)
    good, bad = p_token(a, [GOOD]), p_token(a, [BAD])
    config = dataclasses.replace(grpo.controller_config(spec, 4, "t"), sampling=params.sampling)
    assert config.objective.micro_batch_size == 4 and config.prompts_per_step == 2
    sampler = FakeSampler()
    reporter = Reporter()
    controller = Controller(
        config, a, FakePrompts(), sampler, FakeScorer(), FakePublisher(sampler), reporter, tmp_path
    )
    await controller.start()
    await controller.run()
    assert p_token(a, [GOOD]) > 1.5 * good and p_token(a, [BAD]) < bad / 1.5
    kls = [values["kl"] for _, values in reporter.metric_events]
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0
