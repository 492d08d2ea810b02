"""GRPO's math (services/trainer/rl_math.py) on numbers worked out by hand, and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.trainer import rl_math
from services.trainer.rl_math import LossType

ALL = torch.ones(4, dtype=torch.bool)


def test_group_advantages_normalise_by_the_group_std() -> None:
    """rewards [1, 0, 0, 1]: mean 0.5, population std 0.5 -> [1, -1, -1, 1]."""
    adv = rl_math.group_advantages(torch.tensor([1.0, 0, 0, 1]), ALL, 4)
    assert adv.tolist() == [1.0, -1.0, -1.0, 1.0]
    unscaled = rl_math.group_advantages(torch.tensor([1.0, 0, 0, 1]), ALL, 4, scale_rewards=False)
    assert unscaled.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_a_masked_sample_gets_zero_and_stays_out_of_the_group_statistics() -> None:
    """Group [2, 0, x, 1] with x unscorable: valid mean 1, deviations (1, -1, 0), population
    std sqrt(2/3) -> (1.2247, -1.2247, 0, 0); x's value (99) never counts. The second group
    [3, 3, 3, 3] has zero std and gets zeros."""
    adv = rl_math.group_advantages(
        torch.tensor([2.0, 0, 99, 1, 3, 3, 3, 3]),
        torch.tensor([True, True, False, True, True, True, True, True]),
        4,
    )
    s = math.sqrt(2 / 3)
    assert adv.tolist() == pytest.approx([1 / s, -1 / s, 0.0, 0.0, 0, 0, 0, 0])


def test_the_reward_of_a_sample_that_is_not_ok_is_never_read() -> None:
    """A non-OK sample's reward is meaningless and may be NaN or inf (NaN * 0 is NaN): group
    [1, 0, NaN, 1] with the NaN masked is [1, 0, 1] -> mean 2/3, std sqrt(2)/3
    -> (1/sqrt 2, -sqrt 2, 0, 1/sqrt 2)."""
    valid = torch.tensor([True, True, False, True])
    for bad in (math.nan, math.inf):
        adv = rl_math.group_advantages(torch.tensor([1.0, 0, bad, 1]), valid, 4)
        h = 1 / math.sqrt(2)
        assert adv.tolist() == pytest.approx([h, -2 * h, 0.0, h])


def test_a_group_with_one_valid_sample_has_no_advantage() -> None:
    valid = torch.tensor([True, False, False, False])
    assert rl_math.group_advantages(torch.tensor([5.0, 1, 2, 3]), valid, 4).tolist() == [0.0] * 4


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
    st.booleans(),
)
def test_each_group_advantages_sum_to_zero_and_masked_ones_are_zero(
    case: tuple[int, tuple[int, list[float], list[bool]]], scale: bool
) -> None:
    _b, (g, rewards, valid) = case
    r, v = torch.tensor(rewards, dtype=torch.float64), torch.tensor(valid)
    adv = rl_math.group_advantages(r, v, g, scale_rewards=scale)
    assert torch.all(adv[~v] == 0)
    for group in adv.view(-1, g):
        assert abs(float(group.sum())) < 1e-6 * g
    if scale:  # a normalised informative group has unit population std over its valid samples
        for a, m in zip(adv.view(-1, g), v.view(-1, g), strict=True):
            if a.abs().sum() > 0:
                assert float(a[m].pow(2).mean()) == pytest.approx(1.0, rel=1e-6)


def test_clipped_surrogate_takes_the_pessimistic_branch() -> None:
    """epsilon 0.2. Token 1: ratio e^0.5 = 1.6487, A = +1 -> clipped at 1.2, loss -1.2.
    Token 2: ratio e^-0.5 = 0.6065, A = +1 -> unclipped is smaller, loss -0.6065.
    Sample 2, A = -2: ratio 1.6487 -> -min(-3.297, -2.4) = 3.297 (unclipped, no clip bit);
    ratio 1 -> loss 2."""
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.5, -0.5], [0.5, 0.0]])
    mask = torch.ones(2, 2)
    loss, clipped = rl_math.clipped_surrogate(logp, old, torch.tensor([1.0, -2.0]), mask, 0.2)
    e = math.exp(0.5)
    assert loss.flatten().tolist() == pytest.approx([-1.2, -1 / e, 2 * e, 2.0], rel=1e-6)
    assert clipped.tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_k3_matches_the_hand_value_and_is_never_negative() -> None:
    """d = log pi_ref - log pi = -1: e^-1 - (-1) - 1 = 0.36788; masked tokens give 0."""
    kl = rl_math.k3_kl(
        torch.tensor([[0.0, 0.0]]), torch.tensor([[-1.0, 3.0]]), torch.tensor([[1.0, 0]])
    )
    assert kl.flatten().tolist() == pytest.approx([math.exp(-1), 0.0], rel=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=8), st.floats(-5, 5))
def test_k3_is_non_negative(logps: list[float], shift: float) -> None:
    logp = torch.tensor([logps])
    kl = rl_math.k3_kl(logp, logp + shift, torch.ones_like(logp))
    assert torch.all(kl >= -1e-6)


def test_the_three_aggregations_on_one_batch() -> None:
    """Per-token loss [[1, 3, -], [2, -, -]] (- is masked), max_len 4:
    grpo: mean(mean(1, 3), 2) = 2; dr_grpo: (1 + 3 + 2) / (2 * 4) = 0.75;
    dapo: (1 + 3 + 2) / 3 tokens = 2."""
    loss = torch.tensor([[1.0, 3.0, 7.0], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = {t: float(rl_math.AGGREGATIONS[t](loss, mask, 4)) for t in LossType}
    assert got == {LossType.GRPO: 2.0, LossType.DR_GRPO: 0.75, LossType.DAPO: 2.0}
    longer = torch.tensor([[1.0, 3.0, 5.0], [2.0, 9.0, 9.0]])
    mask2 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # grpo weighs each sequence the same: (3 + 2) / 2; dapo each token: 11 / 4.
    assert float(rl_math.AGGREGATIONS[LossType.GRPO](longer, mask2, 4)) == 2.5
    assert float(rl_math.AGGREGATIONS[LossType.DAPO](longer, mask2, 4)) == 2.75


def test_a_fully_masked_sample_is_out_of_every_aggregation() -> None:
    loss = torch.tensor([[4.0, 4.0], [100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for loss_type in LossType:
        assert float(rl_math.AGGREGATIONS[loss_type](loss, mask, 2)) == 4.0


def test_grpo_loss_on_policy_equals_minus_the_mean_advantage_and_beta_adds_kl() -> None:
    """On policy (ratio 1) the surrogate is -A per token: advantages [1, -1] give 0.
    With a reference at log pi - 1 and beta 0.5: + 0.5 * (e^-1 + 1 - 1) per token."""
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.ones(2, 3)
    adv = torch.tensor([1.0, -1.0])
    out = rl_math.grpo_loss(
        logp, logp.detach(), None, adv, mask,
        epsilon=0.2, beta=0.0, loss_type=LossType.GRPO, max_len=3,
    )  # fmt: skip
    assert float(out.loss.detach()) == 0.0 and out.kl == 0.0 and out.clip_fraction == 0.0
    out.loss.backward()
    assert logp.grad is not None  # d/dlogp of -A * ratio = -A / (N * T)
    assert logp.grad.flatten().tolist() == pytest.approx([-1 / 6] * 3 + [1 / 6] * 3)
    with_kl = rl_math.grpo_loss(
        logp, logp.detach(), logp.detach() - 1, adv, mask,
        epsilon=0.2, beta=0.5, loss_type=LossType.GRPO, max_len=3,
    )  # fmt: skip
    assert with_kl.kl == pytest.approx(math.exp(-1))
    assert float(with_kl.loss.detach()) == pytest.approx(0.5 * math.exp(-1))
