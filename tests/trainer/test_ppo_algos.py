"""PPO's math (`rl/ppo_algos.py`): hand-worked numbers, and the whole loss on one fixed batch
against verl's formulas.

TRL 1.16 has no PPO (`trl.experimental` holds no `ppo`), so the peer is verl's
`verl/trainer/ppo/core_algos.py` and `verl/utils/torch_functional.py` (volcengine/verl at
b178a3cd56f58b2d502255daba591e92833930a7, 2026-01-29): `compute_rewards`, `masked_whiten`,
`compute_gae_advantage_return`, `compute_policy_loss_vanilla` (token-mean) and
`compute_value_loss`, written out below line for line as verl has them (verl is not installable
beside our pins: it needs ray and its own torch).
"""

from __future__ import annotations

import pytest
import torch

from services.trainer.rl import algos, ppo_algos

# verl's formulas ----------------------------------------------------------------------------


def verl_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / (mask.sum() + 1e-8)


def verl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True):  # type: ignore[no-untyped-def]
    mean = verl_masked_mean(values, mask)
    variance = verl_masked_mean((values - mean) ** 2, mask)
    variance = variance * mask.sum() / (mask.sum() - 1)  # unbiased
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def verl_compute_gae_advantage_return(rewards, values, response_mask, gamma, lam):  # type: ignore[no-untyped-def]
    nextvalues, lastgaelam, advantages_reversed = 0, 0, []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return verl_masked_whiten(advantages, response_mask), returns


def verl_compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, clip):  # type: ignore[no-untyped-def]
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * 3.0  # dual-clip bound clip_ratio_c; not reached on this batch
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return verl_masked_mean(pg_losses, response_mask), pg_clipfrac


def verl_compute_value_loss(vpreds, returns, values, response_mask, cliprange_value):  # type: ignore[no-untyped-def]
    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * verl_masked_mean(torch.max(vf_losses1, vf_losses2), response_mask)
    return vf_loss, verl_masked_mean(torch.gt(vf_losses2, vf_losses1).float(), response_mask)


# Hand-worked --------------------------------------------------------------------------------

MASK = torch.tensor([[1.0, 1, 1], [1, 1, 0]])  # sample 1 has two tokens, then padding


def test_gae_by_hand() -> None:
    """gamma 0.9, lambda 0.5 (gamma * lambda = 0.45); sample 1's third value (9) is padding.

    Sample 0, rewards (0, 0, 1), values (0.1, 0.2, 0.3):
      t=2: delta = 1 - 0.3 = 0.7                     A = 0.7
      t=1: delta = 0.9 * 0.3 - 0.2 = 0.07            A = 0.07 + 0.45 * 0.7 = 0.385
      t=0: delta = 0.9 * 0.2 - 0.1 = 0.08            A = 0.08 + 0.45 * 0.385 = 0.25325
      returns A + V = (0.35325, 0.585, 1.0)
    Sample 1, rewards (0.5, 0), values (0.4, 0.5), nothing after its last token:
      t=1: delta = 0 - 0.5 = -0.5                    A = -0.5
      t=0: delta = 0.5 + 0.9 * 0.5 - 0.4 = 0.55      A = 0.55 - 0.45 * 0.5 = 0.325
      returns (0.725, 0.0), and 0 on the padding.
    """
    rewards = torch.tensor([[0.0, 0, 1], [0.5, 0, 7]])  # 7 on padding is never read
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9]])
    adv, ret = ppo_algos.gae(rewards, values, MASK, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.25325, 0.385, 0.7], [0.325, -0.5, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.35325, 0.585, 1.0], [0.725, 0.0, 0]]))


def test_whitening_by_hand() -> None:
    """Tokens 1, 2, 3 and 4 (the rest masked): mean 2.5, unbiased variance
    (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, std 1.2910: (x - 2.5) / 1.2910 = -1.1619, -0.3873,
    0.3873, 1.1619. Without shifting the mean, 2.5 is added back."""
    x = torch.tensor([[1.0, 2, 3], [4, 100, 100]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    expected = torch.tensor([[-1.1619, -0.3873, 0.3873], [1.1619, 0, 0]])
    torch.testing.assert_close(ppo_algos.masked_whiten(x, mask), expected, atol=1e-4, rtol=0)
    kept = ppo_algos.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, (expected + 2.5) * mask, atol=1e-4, rtol=0)


def test_value_clip_loss_by_hand() -> None:
    """cliprange_value 0.2. Token 0: V 1.0, old 0.5, R 0: V_clip 0.7; max(1.0, 0.49) = 1.0 (the
    unclipped loss is larger: no clip). Token 1: V 0.6, old 0, R 1: V_clip 0.2; max(0.16, 0.64)
    = 0.64 (clipped). loss = 0.5 * (1.0 + 0.64) / 2 = 0.41; clip fraction 1/2. The gradient
    flows only through token 0 (token 1's larger branch is clipped, constant in V)."""
    values = torch.tensor([[1.0, 0.6]], requires_grad=True)
    out = ppo_algos.value_loss(
        values, torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), 0.2
    )
    assert float(out.loss.detach()) == pytest.approx(0.41) and out.clip_fraction == 0.5
    out.loss.backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0]]))  # 0.5 * 2 * (1 - 0) / 2


def test_token_rewards_by_hand_and_a_failed_sample_adds_nothing() -> None:
    """kl_coef 0.5. Sample 0 (score 1, KL 0.1, 0.2, 0): -0.05, -0.1, 1.0 (the score on its last
    token). Sample 1 (score 0.5, one token, KL 0.3): 0.5 - 0.15 = 0.35. Sample 2 failed (NaN
    score, no token in the mask): 0 everywhere, and so are its advantages and returns."""
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.3, 0, 0], [5, 5, 5]]) * mask
    scores = torch.tensor([1.0, 0.5, float("nan")])
    rewards = ppo_algos.token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, 1.0], [0.35, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(rewards, expected)
    adv, ret = ppo_algos.gae(rewards, torch.full((3, 3), 0.2), mask, 1.0, 0.95)
    assert bool(torch.all(adv[2] == 0)) and bool(torch.all(ret[2] == 0))
    assert bool(torch.isfinite(adv).all())
    clipped = ppo_algos.token_rewards(torch.tensor([3.0, -3.0, 0]), kl * 0, mask, 0.5, 2.0)
    assert clipped[0, 2] == 2.0 and clipped[1, 0] == -2.0  # reward_clip 2


def test_explained_variance_and_the_kl_controller() -> None:
    """Returns (0, 2) with values (0, 2): 1; values (1, 1) (their mean): 0. A fixed coefficient
    never moves; the adaptive one moves by at most 20% x n / horizon per batch."""
    r, m = torch.tensor([[0.0, 2.0]]), torch.ones(1, 2)
    assert ppo_algos.explained_variance(torch.tensor([[0.0, 2.0]]), r, m) == 1.0
    assert ppo_algos.explained_variance(torch.tensor([[1.0, 1.0]]), r, m) == 0.0
    fixed = ppo_algos.KlController(0.05)
    fixed.update(10.0, n=64)
    assert fixed.value == 0.05
    adaptive = ppo_algos.KlController(0.05, target=0.1, horizon=640)
    adaptive.update(0.05, n=64)  # half the target: e = -0.5 -> -0.2; x (1 - 0.2 * 0.1)
    assert adaptive.value == pytest.approx(0.05 * 0.98)


# Parity with verl on one fixed batch -----------------------------------------------------------


def test_the_ppo_losses_equal_verl_s_on_one_batch() -> None:
    """N 6 samples of up to 5 tokens (right-padded), one failed: rewards with the KL penalty,
    GAE (gamma 1, lambda 0.95), whitened advantages, the clipped policy loss (token mean) and the
    clipped value loss, ours and verl's, values and gradients."""
    torch.manual_seed(0)
    n, t = 6, 5
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = (torch.arange(t) < lengths.unsqueeze(1)).float()  # (N, T)
    mask[3] = 0  # sample 3's reward failed
    scores = torch.tensor([1.0, 0.0, 0.5, float("nan"), -1.0, 2.0])
    old_logp = -torch.rand(n, t) * 2
    ref_logp = old_logp + 0.1 * torch.randn(n, t)
    old_values = 0.5 * torch.randn(n, t)
    logp = (old_logp + 0.3 * torch.randn(n, t)).requires_grad_(True)
    values = (old_values + 0.3 * torch.randn(n, t)).requires_grad_(True)
    kl_coef, gamma, lam, clip, clip_v = 0.1, 1.0, 0.95, 0.2, 0.2

    kl = (old_logp - ref_logp) * mask
    ours_r = ppo_algos.token_rewards(scores, kl, mask, kl_coef)
    ours_adv, ours_ret = ppo_algos.gae(ours_r, old_values * mask, mask, gamma, lam)
    ours_adv = ppo_algos.masked_whiten(ours_adv, mask)
    ratio = torch.exp(algos.log_ratio(logp, old_logp, mask))
    per_token, clipped = algos.clipped_surrogate(ratio, ours_adv, clip)
    ours_pg = ppo_algos.masked_mean(per_token, mask)
    ours_vf = ppo_algos.value_loss(values, old_values * mask, ours_ret, mask, clip_v)

    # verl: scores on the last response token, then compute_rewards (token_level_scores - kl *
    # kl_ratio), on a batch without the failed sample (verl has no per-sample status).
    keep = mask.sum(dim=1) > 0
    m = mask[keep]
    last = torch.zeros_like(m).scatter_(1, (m.sum(dim=1).long() - 1).unsqueeze(1), 1.0)
    token_scores = scores[keep].unsqueeze(1) * last
    verl_r = (token_scores - (old_logp - ref_logp)[keep] * kl_coef) * m
    verl_adv, verl_ret = verl_compute_gae_advantage_return(
        verl_r, old_values[keep] * m, m, gamma, lam
    )
    verl_logp = logp.detach()[keep].requires_grad_(True)
    verl_values = values.detach()[keep].requires_grad_(True)
    verl_pg, verl_clipfrac = verl_compute_policy_loss_vanilla(
        old_logp[keep], verl_logp, verl_adv, m, clip
    )
    verl_vf, verl_vf_clipfrac = verl_compute_value_loss(
        verl_values, verl_ret, old_values[keep] * m, m, clip_v
    )

    torch.testing.assert_close(ours_r[keep], verl_r)
    torch.testing.assert_close(ours_adv[keep], verl_adv * m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_ret[keep], verl_ret * m, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours_pg, verl_pg, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_vf.loss, verl_vf, atol=1e-6, rtol=1e-5)
    assert float(ppo_algos.masked_mean(clipped, mask)) == pytest.approx(float(verl_clipfrac))
    assert ours_vf.clip_fraction == pytest.approx(float(verl_vf_clipfrac))
    assert 0 < float(verl_clipfrac) < 1 and 0 < float(verl_vf_clipfrac) < 1  # both clips bit
    (ours_pg + ours_vf.loss).backward()
    (verl_pg + verl_vf).backward()
    assert logp.grad is not None and values.grad is not None
    assert verl_logp.grad is not None and verl_values.grad is not None
    torch.testing.assert_close(logp.grad[keep], verl_logp.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(values.grad[keep], verl_values.grad, atol=1e-6, rtol=1e-5)
    assert bool(torch.all(logp.grad[3] == 0)) and bool(torch.all(values.grad[3] == 0))
