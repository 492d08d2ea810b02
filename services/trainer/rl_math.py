"""GRPO's math as pure functions (no I/O): group advantages, the clipped surrogate, the k3 KL
estimator and the loss aggregations, registered under `LossType`.

Shapes: N samples = B prompts x G generations, laid out group by group (sample i belongs to
group i // G); T = the longest completion in the batch. Per-token tensors are (N, T) with a
0/1 `mask` for real completion tokens of samples that have a reward.

References: Shao et al. 2024, "DeepSeekMath" (GRPO, eq. 3-4); Schulman et al. 2017 (PPO's
clipped objective); Schulman 2020, "Approximating KL Divergence" (k3); Liu et al. 2025,
"Understanding R1-Zero-Like Training" (Dr. GRPO); Yu et al. 2025, "DAPO".
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

STD_FLOOR = 1e-6  # a group whose rewards are this close to equal carries no signal


class LossType(enum.StrEnum):
    GRPO = "grpo"
    DR_GRPO = "dr_grpo"
    DAPO = "dapo"


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int, scale_rewards: bool = True
) -> torch.Tensor:
    """Outcome advantages A_i = (r_i - mean(r_group)) / std(r_group) (DeepSeekMath 4.1.2).

    rewards: (N,) float, valid: (N,) bool, N = B * group_size. Group statistics use valid
    samples only (population std); invalid samples get 0. A group with fewer than 2 valid
    samples or equal rewards gets 0 everywhere. scale_rewards=False keeps r - mean (Dr. GRPO).
    Returns (N,).

    >>> group_advantages(torch.tensor([1.0, 0, 0, 1]), torch.ones(4, dtype=torch.bool), 4)
    tensor([ 1., -1., -1.,  1.])
    """
    m = valid.view(-1, group_size).to(torch.float64)  # (B, G)
    # A sample that is not OK has no reward (the reward service's value is meaningless, maybe
    # NaN): never read it, since NaN * 0 is NaN and would poison its whole group.
    r = torch.where(m > 0, rewards.view(-1, group_size).to(torch.float64), 0.0)  # (B, G)
    count = m.sum(dim=1, keepdim=True)  # (B, 1)
    mean = (r * m).sum(dim=1, keepdim=True) / count.clamp_min(1)  # (B, 1)
    var = (((r - mean) * m) ** 2).sum(dim=1, keepdim=True) / count.clamp_min(1)  # (B, 1)
    std = var.sqrt()  # (B, 1)
    centred = (r - mean) * m  # (B, G)
    scaled = centred / std.clamp_min(STD_FLOOR) if scale_rewards else centred
    informative = (count >= 2) & (std > STD_FLOOR)  # (B, 1)
    return (scaled * informative).view(-1).to(rewards.dtype)  # (N,)


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_theta(o_t) - log pi_old(o_t) per token, 0 where mask is 0. All (N, T)."""
    return (logp - old_logp) * mask


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a per-token loss (to minimise), and where clipping bit.

    loss_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A), rho_t = exp(log_ratio_t).
    logp, old_logp, mask: (N, T); advantages: (N,). Returns (loss (N, T), clipped (N, T) 0/1).
    """
    ratio = torch.exp(log_ratio(logp, old_logp, mask))  # (N, T)
    adv = advantages.unsqueeze(1)  # (N, 1)
    unclipped = ratio * adv  # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv  # (N, T)
    loss = -torch.min(unclipped, clipped) * mask  # (N, T)
    bit = (clipped < unclipped).to(logp.dtype) * mask  # the min took the clipped branch
    return loss, bit


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate k3 = exp(d) - d - 1, d = log pi_ref - log pi_theta
    (Schulman 2020; DeepSeekMath eq. 4): unbiased and never negative. All (N, T).

    >>> k3_kl(torch.tensor([[0.0]]), torch.tensor([[0.0]]), torch.ones(1, 1))
    tensor([[0.]])
    """
    d = (ref_logp - logp) * mask  # (N, T)
    return (torch.exp(d) - d - 1) * mask


# Aggregations: per-token loss (N, T) and mask (N, T) -> a scalar ---------------------------


def _per_sequence_mean(loss: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """GRPO as in DeepSeekMath eq. 3: 1/G sum_i 1/|o_i| sum_t, then the batch mean."""
    rows = mask.sum(dim=1) > 0  # (N,) samples in the loss
    per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)  # (N,)
    return per_seq[rows].sum() / rows.sum().clamp_min(1)


def _constant_normaliser(loss: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Dr. GRPO: sum over tokens / (samples x max completion length), no length bias."""
    rows = (mask.sum(dim=1) > 0).sum().clamp_min(1)
    return (loss * mask).sum() / (rows * max_len)


def _token_mean(loss: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """DAPO: every token of the batch weighs the same."""
    return (loss * mask).sum() / mask.sum().clamp_min(1)


Aggregation = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
AGGREGATIONS: dict[LossType, Aggregation] = {
    LossType.GRPO: _per_sequence_mean,
    LossType.DR_GRPO: _constant_normaliser,
    LossType.DAPO: _token_mean,
}


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kl: float  # token mean of k3 over the mask (0 without a reference)
    clip_fraction: float  # share of masked tokens where clipping bit


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float,
    beta: float,
    loss_type: LossType,
    max_len: int,
) -> LossOutput:
    """J_GRPO (DeepSeekMath eq. 3) as a loss: aggregate(clipped surrogate + beta * k3).

    logp, old_logp, ref_logp, mask: (N, T); advantages: (N,); max_len: Dr. GRPO's constant
    (the sampling's max_tokens). ref_logp None (beta 0) drops the KL term.
    """
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, mask, epsilon)  # (N, T)
    tokens = mask.sum().clamp_min(1)
    kl_value = 0.0
    if ref_logp is not None and beta > 0:
        kl = k3_kl(logp, ref_logp, mask)  # (N, T)
        per_token = per_token + beta * kl
        kl_value = float((kl.detach() * mask).sum() / tokens)
    loss = AGGREGATIONS[loss_type](per_token, mask, max_len)
    return LossOutput(loss, kl_value, float(clipped.sum() / tokens))
