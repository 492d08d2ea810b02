"""PPO's own math (Schulman et al. 2017) in its RLHF form (Ziegler et al. 2019; Ouyang et al.
2022; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"), pure functions:
the per-token reward with its KL penalty, whitening, GAE, the clipped value loss, explained
variance and the adaptive KL controller. The clipped policy loss is `algos.clipped_surrogate`.

Shapes as in `algos`: N samples, T the longest completion, per-token tensors (N, T) with a 0/1
`mask` of the tokens in the loss (a sample whose reward is not OK has no token in it). Each
function is the formula of verl's `verl/trainer/ppo/core_algos.py` (and `verl/utils/
torch_functional.py`) of the same name, which TRL's former `PPOTrainer` also computes
(tests/trainer/test_ppo_algos.py holds them to it on one batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WHITEN_EPS = 1e-8  # verl's and TRL's: (x - mean) * rsqrt(var + 1e-8)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the mask's tokens (0 without any). x, mask: (N, T). Returns a scalar."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the mask's tokens, the variance unbiased (n - 1), as
    verl's `masked_whiten`; `shift_mean` False adds the mean back (rewards keep their sign).
    0 where mask is 0; x unchanged with fewer than 2 tokens. (N, T).

    >>> masked_whiten(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    tensor([[-0.7071,  0.7071,  0.0000]])

    (mean 2, unbiased var ((1-2)^2 + (3-2)^2) / 1 = 2: -1 / sqrt(2), 1 / sqrt(2); 9 is masked.)
    """
    n = mask.sum()
    if n < 2:
        return x * mask
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """(N, T) 0/1: each row's last loss token (none for a row without one)."""
    n_tokens = mask.sum(dim=1).long()  # (N,)
    at = (n_tokens - 1).clamp_min(0)  # (N,)
    one_hot = torch.zeros_like(mask).scatter_(1, at.unsqueeze(1), 1.0)  # (N, T)
    return one_hot * (n_tokens > 0).unsqueeze(1)


def token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward_clip: float = 0.0,
) -> torch.Tensor:
    """r_t = -kl_coef * KL_t, plus the sample's score on its last completion token (Ziegler et
    al. 2019, eq. 2; verl's `compute_rewards`). KL_t = log pi_old - log pi_ref (k1); the score
    is clipped to [-reward_clip, reward_clip] when reward_clip > 0 (Huang et al. 2024, detail
    on reward clipping). scores: (N,), read only on rows with a loss token (NaN elsewhere);
    kl, mask: (N, T). Returns (N, T), 0 where mask is 0.

    >>> token_rewards(torch.tensor([2.0, float("nan")]), torch.tensor([[0.5, 1.0], [9.0, 9.0]]),
    ...               torch.tensor([[1.0, 1.0], [0.0, 0.0]]), kl_coef=0.1, reward_clip=1.0)
    tensor([[-0.0500,  0.9000],
            [ 0.0000,  0.0000]])
    """
    has = mask.sum(dim=1) > 0  # (N,)
    score = torch.where(has, scores, 0.0)  # (N,) never read a failed sample's reward
    if reward_clip > 0:
        score = score.clamp(-reward_clip, reward_clip)
    rewards = -kl_coef * kl + score.unsqueeze(1) * last_token(mask)  # (N, T)
    return torch.where(mask > 0, rewards, 0.0)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over completion tokens,
    verl's `compute_gae_advantage_return` before its whitening:

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},

    with V and A past the last token 0, and the returns R_t = A_t + V_t, the critic's targets.
    rewards, values, mask: (N, T), right-padded. Returns (advantages, returns), (N, T), 0 where
    mask is 0. No gradient.

    >>> adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2),
    ...                gamma=1.0, lam=0.5)
    >>> adv, ret  # delta_1 = 1 - 0.25; delta_0 = 0 + 0.25 - 0.5; A_0 = -0.25 + 0.5 * 0.75
    (tensor([[0.1250, 0.7500]]), tensor([[0.6250, 1.0000]]))
    """
    with torch.no_grad():
        values = values * mask
        next_value = torch.zeros_like(values[:, 0])  # (N,)
        next_adv = torch.zeros_like(values[:, 0])  # (N,)
        reversed_adv = []
        for t in reversed(range(rewards.shape[1])):
            m = mask[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]  # (N,)
            adv = delta + gamma * lam * next_adv
            # Padding (right of a completion) carries nothing back: keep the next values.
            next_value = values[:, t] * m + (1 - m) * next_value
            next_adv = adv * m + (1 - m) * next_adv
            reversed_adv.append(next_adv * m)
        advantages = torch.stack(reversed_adv[::-1], dim=1)  # (N, T)
        return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class ValueLoss:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: float  # share of tokens where the clipped branch was the larger


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> ValueLoss:
    """The clipped value loss (verl's `compute_value_loss`, token mean; TRL's PPO):

        V_clip = old + clip(V - old, -c, c),  loss = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2).

    values: (N, T) differentiable; old_values, returns, mask: (N, T).

    >>> v, r = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    >>> out = value_loss(v, torch.zeros(1, 2), r, torch.ones(1, 2), 0.5)
    >>> out.loss, out.clip_fraction  # token 0: max(1, (0.5 - 2)^2 = 2.25); token 1: 1
    (tensor(0.8125), 0.5)
    """
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2  # (N, T)
    clipped_loss = (clipped - returns) ** 2  # (N, T)
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    fraction = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return ValueLoss(loss, float(fraction))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the mask's tokens: 1 when the critic predicts the returns, 0
    when it predicts their mean, negative when worse (as Stable-Baselines3 and OpenRLHF report).

    >>> explained_variance(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]]), torch.ones(1, 2))
    0.0
    """
    mean_r = masked_mean(returns, mask)
    var_r = masked_mean((returns - mean_r) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else 0.0


@dataclass
class KlController:
    """kl_coef, fixed (target 0) or steered towards a target KL (Ziegler et al. 2019, section
    2.2; verl's `AdaptiveKLController`): e = clip(KL / target - 1, -0.2, 0.2), then
    kl_coef *= 1 + e * n / horizon after a batch of n samples. KL here is verl's: the mean
    over samples of each one's token-mean KL.

    >>> c = KlController(0.1, target=1.0, horizon=100)
    >>> c.update(2.0, n=10); round(c.value, 4)  # e = 0.2: 0.1 * (1 + 0.2 * 10 / 100)
    0.102
    """

    value: float
    target: float = 0.0
    horizon: int = 10_000

    def update(self, kl: float, n: int) -> None:
        if self.target <= 0:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon
