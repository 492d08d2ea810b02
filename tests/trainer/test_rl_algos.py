"""The online-RL math (services/trainer/rl/algos.py) on numbers worked out by hand, and
invariants; its docstring examples run as doctests. Equality with TRL is in
test_grpo_trl_parity.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.trainer.rl import AdvantageEstimator, KlEstimator, LossType, ScaleRewards, algos

ALL = torch.ones(4, dtype=torch.bool)
EPS = algos.STD_EPS


def test_every_enum_value_has_an_entry_in_its_table() -> None:
    assert set(algos.ADVANTAGE_ESTIMATORS) == set(AdvantageEstimator)
    assert set(algos.LOSS_TYPES) == set(LossType)
    assert set(algos.KL_ESTIMATORS) == set(KlEstimator)


# Advantages -----------------------------------------------------------------------------------


def test_group_advantages_divide_by_the_unbiased_group_std_plus_1e_4() -> None:
    """rewards [1, 0, 0, 1]: mean 0.5, std with n - 1 = sqrt(1 / 3) = 0.57735
    -> +-0.5 / 0.57745; "none" keeps +-0.5 (Dr. GRPO)."""
    rewards = torch.tensor([1.0, 0, 0, 1])
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert algos.group_advantages(rewards, ALL, 4).tolist() == pytest.approx([a, -a, -a, a])
    unscaled = algos.group_advantages(rewards, ALL, 4, ScaleRewards.NONE)
    assert unscaled.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_batch_scaling_centres_per_group_and_divides_by_the_batch_std() -> None:
    """Groups [1, 0, 0, 1] and [3, 3, 3, 3]. Batch mean 14 / 8 = 1.75; squared deviations
    2 x 0.5625 + 2 x 3.0625 + 4 x 1.5625 = 13.5, / 7 -> std 1.38873. The first group's
    r - mean(group) = +-0.5 -> +-0.5 / 1.38883 = +-0.36002; the second group is all 0."""
    rewards = torch.tensor([1.0, 0, 0, 1, 3, 3, 3, 3])
    adv = algos.group_advantages(rewards, torch.ones(8, dtype=torch.bool), 4, ScaleRewards.BATCH)
    a = 0.5 / (math.sqrt(13.5 / 7) + EPS)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0])


def test_a_masked_sample_gets_zero_and_stays_out_of_the_group_statistics() -> None:
    """Group [2, 0, x, 1] with x unscorable: mean 1, deviations (1, -1, 0), unbiased std
    sqrt(2 / 2) = 1 -> (1 / 1.0001, -1 / 1.0001, 0, 0); x's 99 never counts. The second group
    [3, 3, 3, 3] has std 0: 0 / 1e-4 = 0."""
    adv = algos.group_advantages(
        torch.tensor([2.0, 0, 99, 1, 3, 3, 3, 3]),
        torch.tensor([True, True, False, True, True, True, True, True]),
        4,
    )
    a = 1 / (1 + EPS)
    assert adv.tolist() == pytest.approx([a, -a, 0.0, 0.0, 0, 0, 0, 0])


def test_the_reward_of_a_sample_that_is_not_ok_is_never_read() -> None:
    """A non-OK sample's reward is meaningless and may be NaN or inf (NaN * 0 is NaN): group
    [1, 0, NaN, 1] with the NaN masked is [1, 0, 1] -> mean 2/3, deviations (1/3, -2/3, 1/3),
    squares 6/9 over n - 1 = 2 -> std sqrt(1/3), in every scaling."""
    valid = torch.tensor([True, True, False, True])
    s = math.sqrt(1 / 3) + EPS
    for bad in (math.nan, math.inf):
        for scale in ScaleRewards:
            adv = algos.group_advantages(torch.tensor([1.0, 0, bad, 1]), valid, 4, scale)
            d = s if scale is not ScaleRewards.NONE else 1.0
            assert adv.tolist() == pytest.approx([1 / 3 / d, -2 / 3 / d, 0.0, 1 / 3 / d])


@pytest.mark.parametrize("scale", list(ScaleRewards))
def test_a_group_with_one_valid_sample_has_no_advantage(scale: ScaleRewards) -> None:
    valid = torch.tensor([True, False, False, False, True, True, False, False])
    rewards = torch.tensor([5.0, 1, 2, 3, 0, 1, 7, 7])
    adv = algos.group_advantages(rewards, valid, 4, scale)
    assert adv[:4].tolist() == [0.0] * 4 and adv[4] < 0 < adv[5]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda b: st.tuples(
            st.just(b),
            st.integers(2, 6).flatmap(
                lambda g: st.tuples(
                    st.just(g),
                    st.lists(st.floats(-10, 10), min_size=b * g, max_size=b * g),
                    st.lists(st.booleans(), min_size=b * g, max_size=b * g),
                )
            ),
        )
    ),
    st.sampled_from(list(ScaleRewards)),
)
def test_each_group_advantages_sum_to_zero_and_masked_ones_are_zero(
    case: tuple[int, tuple[int, list[float], list[bool]]], scale: ScaleRewards
) -> None:
    _b, (g, rewards, valid) = case
    r, v = torch.tensor(rewards, dtype=torch.float64), torch.tensor(valid)
    adv = algos.group_advantages(r, v, g, scale)
    assert torch.all(adv[~v] == 0)
    for group in adv.view(-1, g):
        assert abs(float(group.sum())) < 1e-6 * g
    if scale is ScaleRewards.GROUP:  # the group's std s becomes s / (s + 1e-4)
        for a, x, m in zip(adv.view(-1, g), r.view(-1, g), v.view(-1, g), strict=True):
            if int(m.sum()) >= 2:
                s = float(x[m].std())
                assert float(a[m].std()) == pytest.approx(s / (s + EPS), rel=1e-6, abs=1e-9)


def test_the_grpo_estimator_puts_each_sample_advantage_on_its_loss_tokens() -> None:
    """Two groups of 2: [1, 0] -> +-0.5 / (sqrt(0.5) + 1e-4); [2, 2] -> 0. Token masks cut it."""
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    inputs = algos.AdvantageInputs(
        torch.tensor([1.0, 0, 2, 2]), torch.tensor([True, True, True, False]), 2, mask
    )
    adv = algos.ADVANTAGE_ESTIMATORS[AdvantageEstimator.GRPO](inputs, algos.AdvantageOptions())
    a = 0.5 / (math.sqrt(0.5) + EPS)
    assert adv.shape == (4, 3)
    assert adv.flatten().tolist() == pytest.approx([a, a, 0, -a, 0, 0, 0, 0, 0, 0, 0, 0])


# Log-probs and importance weights -------------------------------------------------------------


def test_log_probs_at_a_temperature_are_those_of_logits_divided_by_it() -> None:
    """logits (0, ln 3): p = (1/4, 3/4) at T = 1; at T = 0.5 the logits double, p(1) = 9 / 10;
    at T = 2 they halve, p(1) = sqrt 3 / (1 + sqrt 3)."""
    logits = torch.tensor([[0.0, math.log(3)]])
    target = torch.tensor([1])
    for t, p in ((1.0, 0.75), (0.5, 0.9), (2.0, math.sqrt(3) / (1 + math.sqrt(3)))):
        got = algos.token_logprobs(logits, target, t).exp()
        assert got.tolist() == pytest.approx([p])
    logits16 = torch.randn(2, 5, 7).to(torch.bfloat16)
    targets = torch.randint(0, 7, (2, 5))
    got = algos.token_logprobs(logits16, targets, 0.7)
    assert got.dtype == torch.float32 and got.shape == (2, 5)  # fp32 math on 16-bit logits


def test_truncated_is_weights_cap_the_ratio_and_ignore_what_is_not_in_the_loss() -> None:
    """pi_old / pi_sampler per token: e^0.5 = 1.6487; e^2 = 7.39 capped at 2; e^-1 = 0.3679;
    a NaN sampler log-prob and a masked token get 1. No gradient flows through the weights."""
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    sampling = torch.tensor([[-0.5, -2.0, 1.0], [math.nan, 5.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    w = algos.truncated_is_weights(old, sampling, mask, cap=2.0)
    assert w.flatten().tolist() == pytest.approx([math.exp(0.5), 2.0, math.exp(-1), 1, 1, 1])
    assert not w.requires_grad


# KL estimators ----------------------------------------------------------------------------------


def test_k1_and_k3_match_the_hand_values_and_masked_tokens_give_0() -> None:
    """d = log pi_ref - log pi = -1: k3 = e^-1 + 1 - 1 = 0.36788, k1 = 1; masked: 0."""
    logp, ref, mask = torch.zeros(1, 2), torch.tensor([[-1.0, 3.0]]), torch.tensor([[1.0, 0]])
    assert algos.k3(logp, ref, mask).flatten().tolist() == pytest.approx([math.exp(-1), 0.0])
    assert algos.k1(logp, ref, mask).flatten().tolist() == [1.0, 0.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=8), st.floats(-5, 5))
def test_k3_is_non_negative(logps: list[float], shift: float) -> None:
    logp = torch.tensor([logps])
    kl = algos.k3(logp, logp + shift, torch.ones_like(logp))
    assert torch.all(kl >= -1e-6)


# Policy loss and aggregations --------------------------------------------------------------------


def test_clipped_surrogate_takes_the_pessimistic_branch() -> None:
    """epsilon 0.2. Sample 1, A = +1: ratio e^0.5 = 1.6487 is clipped to 1.2 (loss -1.2, clip
    bit); ratio e^-0.5 = 0.6065 stays (the min keeps the smaller). Sample 2, A = -2: ratio
    1.6487 -> -min(-3.297, -2.4) = 3.297, unclipped, no bit; ratio 1 -> loss 2."""
    ratio = torch.exp(torch.tensor([[0.5, -0.5], [0.5, 0.0]]))
    adv = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    loss, clipped = algos.clipped_surrogate(ratio, adv, 0.2)
    e = math.exp(0.5)
    assert loss.flatten().tolist() == pytest.approx([-1.2, -1 / e, 2 * e, 2.0], rel=1e-6)
    assert clipped.tolist() == [[1.0, 0.0], [0.0, 0.0]]


def aggregate(
    loss_type: LossType, loss: torch.Tensor, mask: torch.Tensor, batch_tokens: float | None = None
) -> float:
    norms = algos.Normalisers(max_len=4, batch_tokens=batch_tokens)
    return float(algos.LOSS_TYPES[loss_type].aggregate(loss, mask, norms))


def test_the_four_aggregations_on_one_batch() -> None:
    """Per-token loss [[1, 3, -], [2, -, -]] (- is masked), max_len 4:
    grpo: mean(mean(1, 3), 2) = 2; dr_grpo: (1 + 3 + 2) / (2 x 4) = 0.75;
    dapo and bnpo: (1 + 3 + 2) / 3 tokens = 2. Told the generation batch has 6 loss tokens
    (this being one micro-batch of it), dapo divides by 6 -> 1 while bnpo keeps its own 3."""
    loss = torch.tensor([[1.0, 3.0, 7.0], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = {t: aggregate(t, loss, mask) for t in LossType}
    assert got == {
        LossType.GRPO: 2.0,
        LossType.DR_GRPO: 0.75,
        LossType.DAPO: 2.0,
        LossType.BNPO: 2.0,
    }
    assert aggregate(LossType.DAPO, loss, mask, batch_tokens=6) == 1.0
    assert aggregate(LossType.BNPO, loss, mask, batch_tokens=6) == 2.0
    longer = torch.tensor([[1.0, 3.0, 5.0], [2.0, 9.0, 9.0]])
    mask2 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # grpo weighs each sequence the same: (3 + 2) / 2; dapo each token: 11 / 4.
    assert aggregate(LossType.GRPO, longer, mask2) == 2.5
    assert aggregate(LossType.DAPO, longer, mask2) == 2.75


def test_a_fully_masked_sample_is_out_of_every_aggregation() -> None:
    loss = torch.tensor([[4.0, 4.0], [100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for loss_type in LossType:
        assert aggregate(loss_type, loss, mask) == (2.0 if loss_type is LossType.DR_GRPO else 4.0)


def config(beta: float = 0.0, use_bias_correction_kl: bool = False) -> algos.LossConfig:
    return algos.LossConfig(
        LossType.GRPO, max_len=3, beta=beta, use_bias_correction_kl=use_bias_correction_kl
    )


def test_on_policy_the_loss_is_minus_the_mean_advantage() -> None:
    """Ratio 1: the surrogate is -A per token, advantages +-1 give 0, and the gradient of each
    of the 6 tokens is -A / (2 samples x 3 tokens)."""
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    inputs = algos.LossInputs(logp, logp.detach(), adv, torch.ones(2, 3))
    out = algos.policy_loss(inputs, config())
    assert float(out.loss.detach()) == 0.0 and out.kl == 0.0 and out.clip_fraction == 0.0
    out.loss.backward()
    assert logp.grad is not None
    assert logp.grad.flatten().tolist() == pytest.approx([-1 / 6] * 3 + [1 / 6] * 3)


@pytest.mark.parametrize("corrected", [False, True])
def test_beta_adds_k3_and_the_bias_correction_changes_its_gradient_on_policy(
    corrected: bool,
) -> None:
    """Reference at log pi - 1 (d = -1), beta 0.5, A = 0: the loss is 0.5 x k3 = 0.5 e^-1 both
    ways (rho = 1). d k3 / d log pi = 1 - e^d = 0.63212; with the correction the term is
    k3 x rho and rho's own gradient adds k3: 1 - e^d + e^d - d - 1 = -d = 1. Per token, the
    gradient is 0.5 x that / 6."""
    logp = torch.zeros(2, 3, requires_grad=True)
    inputs = algos.LossInputs(
        logp, logp.detach(), torch.zeros(2, 3), torch.ones(2, 3), ref_logp=logp.detach() - 1
    )
    out = algos.policy_loss(inputs, config(0.5, use_bias_correction_kl=corrected))
    assert out.kl == pytest.approx(math.exp(-1))
    assert float(out.loss.detach()) == pytest.approx(0.5 * math.exp(-1))
    out.loss.backward()
    slope = 1.0 if corrected else 1 - math.exp(-1)
    assert logp.grad is not None
    assert logp.grad.flatten().tolist() == pytest.approx([0.5 * slope / 6] * 6)


def test_is_weights_scale_the_policy_term_but_not_the_kl() -> None:
    """On policy, A = (+1, -1), weights (2, 1): per token -2 and +1 -> grpo mean -0.5. With
    beta 0.5 and k3 = e^-1 everywhere the KL adds 0.5 e^-1, unweighted."""
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    weights = torch.tensor([[2.0] * 3, [1.0] * 3])
    inputs = algos.LossInputs(logp, logp, adv, torch.ones(2, 3), logp - 1, weights)
    assert float(algos.policy_loss(inputs, config()).loss) == -0.5
    with_kl = algos.policy_loss(inputs, config(0.5))
    assert float(with_kl.loss) == pytest.approx(-0.5 + 0.5 * math.exp(-1))


def test_beta_without_reference_log_probs_is_refused() -> None:
    inputs = algos.LossInputs(
        torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    )
    with pytest.raises(ValueError, match="reference"):
        algos.policy_loss(inputs, config(0.1))
