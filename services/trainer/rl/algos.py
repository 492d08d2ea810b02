"""The online-RL math as pure functions (no I/O), in tables keyed by the enums of
`services.trainer.rl`: advantage estimators, policy losses with their aggregations, KL
estimators, plus log-probs at the sampling temperature and truncated importance sampling.

Shapes: N samples = B prompts x G generations, laid out group by group (sample i belongs to
group i // G); T = the longest completion in the batch; V = the vocabulary. Per-token tensors
are (N, T) with a 0/1 `mask` of the tokens in the loss.

GRPO here equals TRL 1.16's `GRPOTrainer` on the same batch, loss and every gradient
(tests/trainer/test_grpo_trl_parity.py): its advantages (`scale_rewards`, std with n - 1, +1e-4),
clipped surrogate, k3 KL with or without `use_bias_correction_kl`, the four aggregations, log-probs
of logits / temperature and token-level truncated IS (`vllm_importance_sampling_mode=
"token_truncate"`, `vllm_importance_sampling_clip_max` as `cap`).

Samples without a reward (`valid` False: the reward service's status is not OK) differ from TRL.
Both leave them out of their group's mean and std (TRL: a reward function's None) and give them
advantage 0. TRL then keeps their tokens in the loss: each still counts in every normaliser (a row
in grpo's mean and in dr_grpo's sample count, its tokens in dapo's and bnpo's) and still carries
its KL term. Here the caller masks every token of such a sample, so it adds nothing, KL included,
and counts in no normaliser: the loss is TRL's on the batch without it. Its reward is never read
(it may be NaN), and it is never a reward of 0.

References: Shao et al. 2024, "DeepSeekMath" (GRPO, eq. 3-4, section 4.1.2); Schulman et al.
2017 (PPO's clipped objective); Schulman 2020, "Approximating KL Divergence" (k1, k3); Liu et al.
2025, "Understanding R1-Zero-Like Training" (Dr. GRPO); Yu et al. 2025, "DAPO"; Liu et al. 2025,
"Part I: Tricks or Traps?" (Lite PPO: batch std); DeepSeek-AI 2025, "DeepSeek-V3.2" (the unbiased
KL estimate weighted by pi_theta / pi_old); Yao et al. 2025, "Your Efficient RL Framework Secretly
Brings You Off-Policy RL Training" (truncated importance sampling); Ahmadian et al. 2024, "Back
to Basics: Revisiting REINFORCE-Style Optimization for Learning from Human Feedback in LLMs"
(RLOO) and Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Hu 2025,
"REINFORCE++" (REINFORCE++-baseline, as OpenRLHF's `ppo_utils/experience_maker.py`).
RLOO and REINFORCE++ put the KL penalty in the reward (`AdvantageInputs.kl`, `kl_coef`), not in
the loss; their masked samples, too, stay out of every statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.trainer.rl import AdvantageEstimator, KlEstimator, LossType, ScaleRewards

STD_EPS = 1e-4  # TRL's: A = (r - mean) / (std + 1e-4), so equal rewards give 0, not 0 / 0

# Log-probs and importance weights ------------------------------------------------------------


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log pi(o_t) under softmax(logits / temperature), the distribution the sampler drew from
    before top-k / top-p (TRL's trainer divides its logits the same way). Computed in fp32.

    logits: (..., V); targets: (...) token ids. Returns (...).

    >>> logits = torch.tensor([[1.0, 3.0]]).log()  # p = (1/4, 3/4)
    >>> token_logprobs(logits, torch.tensor([1])).exp()
    tensor([0.7500])
    >>> token_logprobs(logits, torch.tensor([1]), temperature=0.5).exp()  # 3^2 / (1 + 3^2)
    tensor([0.9000])
    """
    scaled = logits.float() / temperature  # (..., V)
    return torch.log_softmax(scaled, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_theta(o_t) - log pi_old(o_t) per token, 0 where mask is 0. All (N, T)."""
    return (logp - old_logp) * mask


def truncated_is_weights(
    old_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance sampling (TIS, Yao et al. 2025): w_t = min(pi_old / pi_sampler, cap)
    per token, correcting for the rollout engine sampling from a slightly different distribution
    than the trainer computes (other kernels, precision; or an older policy). 1 where mask is 0 or
    the sampler gave no log-prob (NaN). No gradient. All (N, T).

    >>> old, sampling, ones = torch.zeros(1, 3), torch.tensor([[0.0, -2.0, 1.0]]), torch.ones(1, 3)
    >>> truncated_is_weights(old, sampling, ones, cap=3.0)  # e^0, e^2 = 7.39 -> 3, e^-1
    tensor([[1.0000, 3.0000, 0.3679]])
    """
    diff = torch.nan_to_num((old_logp - sampling_logp) * mask, nan=0.0)  # (N, T)
    return torch.exp(diff).clamp(max=cap).detach()


# Advantage estimators: (AdvantageInputs, AdvantageOptions) -> (N, T) ------------------------


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read. `rewards` is read only where `valid` is True."""

    rewards: torch.Tensor  # (N,) one reward per sample
    valid: torch.Tensor  # (N,) bool: the reward service said OK
    group_size: int  # G: samples b*G .. b*G + G - 1 answer prompt b
    mask: torch.Tensor  # (N, T) 0/1 tokens in the loss
    values: torch.Tensor | None = None  # (N, T) a critic's values (GAE); GRPO has none
    kl: torch.Tensor | None = None  # (N, T) KL_t of pi_old to pi_ref, for a KL in the reward


@dataclass(frozen=True)
class AdvantageOptions:
    scale_rewards: ScaleRewards = ScaleRewards.GROUP
    kl_coef: float = 0.0  # beta of a KL penalty in the reward (RLOO, REINFORCE++); needs `kl`


# The std a GRPO advantage is divided by, over the OK rewards along these dims of (B, G).
_STD_DIMS: dict[ScaleRewards, tuple[int, ...] | None] = {
    ScaleRewards.GROUP: (1,),
    ScaleRewards.BATCH: (0, 1),
    ScaleRewards.NONE: None,
}


def _masked_std(x: torch.Tensor, m: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Unbiased (n - 1) std of x where m, along dims (kept); 0 with fewer than 2 entries."""
    n = m.sum(dim=dims, keepdim=True)
    mean = torch.where(m, x, 0.0).sum(dim=dims, keepdim=True) / n.clamp_min(1)
    square = torch.where(m, (x - mean) ** 2, 0.0).sum(dim=dims, keepdim=True)
    return torch.where(n > 1, (square / (n - 1).clamp_min(1)).sqrt(), 0.0)


def group_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    group_size: int,
    scale_rewards: ScaleRewards = ScaleRewards.GROUP,
) -> torch.Tensor:
    """Outcome advantages A_i = (r_i - mean(r_group)) / (std + 1e-4) (DeepSeekMath 4.1.2, as TRL).

    rewards: (N,), valid: (N,) bool, N = B * group_size. The mean is the group's; the std is
    unbiased (n - 1) over the group (GROUP) or the whole batch (BATCH, Lite PPO); NONE keeps
    r - mean (Dr. GRPO). Only OK samples count; the others get 0. A group with one OK sample, or
    equal rewards, gets 0. Returns (N,).

    >>> ok = torch.ones(4, dtype=torch.bool)
    >>> group_advantages(torch.tensor([1.0, 0, 0, 1]), ok, 4)  # 0.5 / (sqrt(1/3) + 1e-4)
    tensor([ 0.8659, -0.8659, -0.8659,  0.8659])
    >>> group_advantages(torch.tensor([1.0, 0, 0, 1]), ok, 4, ScaleRewards.NONE)
    tensor([ 0.5000, -0.5000, -0.5000,  0.5000])
    """
    m = valid.view(-1, group_size)  # (B, G)
    # A sample that is not OK has no reward (the service's value is meaningless, maybe NaN):
    # never read it, since NaN * 0 is NaN and would poison its whole group.
    r = torch.where(m, rewards.view(-1, group_size).to(torch.float64), 0.0)  # (B, G)
    mean = r.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1)  # (B, 1)
    centred = torch.where(m, r - mean, 0.0)  # (B, G)
    dims = _STD_DIMS[scale_rewards]
    if dims is not None:
        centred = centred / (_masked_std(r, m, dims) + STD_EPS)  # (B, G)
    return centred.view(-1).to(rewards.dtype)  # (N,)


def grpo_advantages(inputs: AdvantageInputs, options: AdvantageOptions) -> torch.Tensor:
    """GRPO: each sample's group advantage on every one of its loss tokens. Returns (N, T)."""
    adv = group_advantages(inputs.rewards, inputs.valid, inputs.group_size, options.scale_rewards)
    return adv.unsqueeze(1) * inputs.mask  # (N, T)


def _reward_kl(inputs: AdvantageInputs, options: AdvantageOptions) -> torch.Tensor:
    """beta x KL_t on the loss tokens, the penalty in the reward; zeros with beta 0. (N, T)."""
    if options.kl_coef == 0:
        return torch.zeros_like(inputs.mask, dtype=torch.float64)
    if inputs.kl is None:
        raise ValueError("a KL penalty in the reward needs the per-token KL estimates")
    return options.kl_coef * inputs.kl.to(torch.float64) * inputs.mask  # (N, T)


def leave_one_out_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int
) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, after Kool et al. 2019): A_i = r_i - mean_{j != i} r_j over
    the OK samples of i's group, which is n / (n - 1) x (r_i - mean(r_group)) for n OK samples.
    Samples that are not OK, and a group with one OK sample (no baseline), get 0; a group's
    advantages sum to 0. rewards, valid: (N,), N = B * group_size. Returns (N,).

    >>> ok = torch.tensor([True, True, True, False])
    >>> leave_one_out_advantages(torch.tensor([1.0, 0, 0, float("nan")]), ok, 4)  # 1-0, 0-1/2
    tensor([ 1.0000, -0.5000, -0.5000,  0.0000])
    """
    m = valid.view(-1, group_size)  # (B, G)
    r = torch.where(m, rewards.view(-1, group_size).to(torch.float64), 0.0)  # (B, G)
    n = m.sum(dim=1, keepdim=True)  # (B, 1)
    others = (r.sum(dim=1, keepdim=True) - r) / (n - 1).clamp_min(1)  # (B, G) the rest's mean
    return torch.where(m & (n > 1), r - others, 0.0).view(-1).to(rewards.dtype)  # (N,)


def rloo_advantages(inputs: AdvantageInputs, options: AdvantageOptions) -> torch.Tensor:
    """RLOO: the whole completion is one action (Ahmadian et al. 2024, as TRL's RLOOTrainer up
    to 0.19): its reward R_i = r_i - beta * sum_t KL_t, then the leave-one-out advantage of R_i
    on every loss token. Returns (N, T)."""
    penalty = _reward_kl(inputs, options).sum(dim=1)  # (N,)
    shaped = torch.where(inputs.valid, inputs.rewards.to(torch.float64) - penalty, 0.0)  # (N,)
    adv = leave_one_out_advantages(shaped, inputs.valid, inputs.group_size)  # (N,)
    return (adv.unsqueeze(1) * inputs.mask).to(inputs.rewards.dtype)  # (N, T)


def returns_to_go(token_rewards: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{s >= t} r_s (REINFORCE's return, gamma 1). (N, T) -> (N, T).

    >>> returns_to_go(torch.tensor([[1.0, 2.0, 3.0]]))
    tensor([[6., 5., 3.]])
    """
    return token_rewards.flip(1).cumsum(dim=1).flip(1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the mask's entries (population std, variance floored at 1e-8 as
    OpenRLHF's), 0 off the mask. (N, T) -> (N, T).

    >>> whiten(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    tensor([[-1.,  1.,  0.]])
    """
    count = mask.sum().clamp_min(1)
    mean = (x * mask).sum() / count
    var = (((x - mean) * mask) ** 2).sum() / count
    return (x - mean) * var.clamp_min(1e-8).rsqrt() * mask


def reinforce_pp_advantages(inputs: AdvantageInputs, options: AdvantageOptions) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025; OpenRLHF's `reinforce_baseline`): the reward minus its
    group's mean on the last token, a KL penalty on every token, returns-to-go, then whitened
    over every loss token of the batch:

        r_t = [t = last] (r_i - mean(r_group)) - beta * KL_t
        A_t = whiten(sum_{s >= t} r_s)   over the batch's loss tokens

    Only OK samples count in the group mean and the whitening (a group with one OK sample has
    r_i - mean = 0, but its KL returns and tokens still count). Returns (N, T)."""
    mask = inputs.mask.to(torch.float64)  # (N, T)
    centred = group_advantages(inputs.rewards, inputs.valid, inputs.group_size, ScaleRewards.NONE)
    last = inputs.mask.shape[1] - 1 - mask.fliplr().argmax(dim=1, keepdim=True)  # (N, 1)
    outcome = torch.zeros_like(mask).scatter_(1, last, centred.to(torch.float64).unsqueeze(1))
    token_rewards = (outcome - _reward_kl(inputs, options)) * mask  # (N, T)
    return whiten(returns_to_go(token_rewards), mask).to(inputs.rewards.dtype)  # (N, T)


AdvantageFn = Callable[[AdvantageInputs, AdvantageOptions], torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[AdvantageEstimator, AdvantageFn] = {
    AdvantageEstimator.GRPO: grpo_advantages,
    AdvantageEstimator.RLOO: rloo_advantages,
    AdvantageEstimator.REINFORCE_PP: reinforce_pp_advantages,
}

# KL estimators: (logp, ref_logp, mask) -> (N, T), 0 where mask is 0 --------------------------


def k1(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 = log pi_theta - log pi_ref (Schulman 2020): unbiased, but negative on some tokens.

    >>> k1(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -1.0]]), torch.ones(1, 2))
    tensor([[ 1., -1.]])
    """
    return (logp - ref_logp) * mask


def k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 = exp(d) - d - 1, d = log pi_ref - log pi_theta (Schulman 2020; DeepSeekMath eq. 4):
    unbiased and never negative.

    >>> k3(torch.tensor([[0.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), torch.ones(1, 2))  # e^-1, 0
    tensor([[0.3679, 0.0000]])
    """
    d = (ref_logp - logp) * mask  # (N, T)
    return (torch.exp(d) - d - 1) * mask


def k2(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi_theta - log pi_ref)^2 / 2 (Schulman 2020): biased but low-variance and never
    negative; one of REINFORCE++'s KL-in-reward estimators (Hu 2025, OpenRLHF).

    >>> k2(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -2.0]]), torch.ones(1, 2))
    tensor([[0.5000, 0.0000]])
    """
    return (logp - ref_logp) ** 2 / 2 * mask


KlFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: dict[KlEstimator, KlFn] = {
    KlEstimator.K1: k1,
    KlEstimator.K2: k2,
    KlEstimator.K3: k3,
}

# Policy losses: (ratio, advantages, epsilon) -> (per-token loss, clipped), all (N, T) ---------


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a per-token loss (to minimise) and where clipping bit:
    loss_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) (Schulman et al. 2017).

    >>> loss, bit = clipped_surrogate(torch.tensor([[1.5, 0.5]]), torch.ones(1, 2), 0.2)
    >>> loss, bit  # rho 1.5 > 1.2 with A > 0: clipped; rho 0.5 with A > 0: the min keeps 0.5
    (tensor([[-1.2000, -0.5000]]), tensor([[1., 0.]]))
    """
    unclipped = ratio * advantages  # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages  # (N, T)
    loss = -torch.min(unclipped, clipped)  # (N, T)
    # The min took the clipped branch: the ratio left the trust region in the advantage's way.
    bit = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return loss, bit.to(ratio.dtype)


# Aggregations: per-token loss (N, T), mask (N, T) -> a scalar --------------------------------


@dataclass(frozen=True)
class Normalisers:
    max_len: int  # Dr. GRPO's constant: the sampling's max_tokens
    batch_tokens: float | None = None  # DAPO's: loss tokens of the generation batch (None: mask's)


def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    """GRPO (DeepSeekMath eq. 3): each sample's token mean, then the mean over samples."""
    rows = mask.sum(dim=1) > 0  # (N,) samples in the loss
    per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)  # (N,)
    return per_seq[rows].sum() / rows.sum().clamp_min(1)


def seq_token_sum_over_max_len(
    loss: torch.Tensor, mask: torch.Tensor, n: Normalisers
) -> torch.Tensor:
    """Dr. GRPO: token sum / (samples x max completion length): no length bias."""
    rows = (mask.sum(dim=1) > 0).sum().clamp_min(1)
    return (loss * mask).sum() / (rows * n.max_len)


def batch_token_mean(loss: torch.Tensor, mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    """DAPO: every token of the generation batch weighs the same, however it is micro-batched."""
    if n.batch_tokens is None:
        return (loss * mask).sum() / mask.sum().clamp_min(1)
    return (loss * mask).sum() / max(n.batch_tokens, 1.0)


def token_mean(loss: torch.Tensor, mask: torch.Tensor, n: Normalisers) -> torch.Tensor:
    """TRL's bnpo: every token of this (micro-)batch weighs the same."""
    return (loss * mask).sum() / mask.sum().clamp_min(1)


Aggregation = Callable[[torch.Tensor, torch.Tensor, Normalisers], torch.Tensor]
PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LossDef:
    per_token: PolicyLossFn
    aggregate: Aggregation


# On one (micro-)batch dapo and bnpo agree; they differ once a batch is split into several.
LOSS_TYPES: dict[LossType, LossDef] = {
    LossType.GRPO: LossDef(clipped_surrogate, seq_mean_token_mean),
    LossType.DR_GRPO: LossDef(clipped_surrogate, seq_token_sum_over_max_len),
    LossType.DAPO: LossDef(clipped_surrogate, batch_token_mean),
    LossType.BNPO: LossDef(clipped_surrogate, token_mean),
}

# The loss ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossInputs:
    logp: torch.Tensor  # (N, T) log pi_theta, differentiable
    old_logp: torch.Tensor  # (N, T) log pi_old: the trainer's, before this batch's first update
    advantages: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T) 0/1 tokens in the loss
    ref_logp: torch.Tensor | None = None  # (N, T) log pi_ref; needed when beta > 0
    is_weights: torch.Tensor | None = None  # (N, T) `truncated_is_weights`; None: no correction


@dataclass(frozen=True)
class LossConfig:
    loss_type: LossType
    max_len: int  # Dr. GRPO's constant (the sampling's max_tokens)
    epsilon: float = 0.2
    beta: float = 0.0
    kl_estimator: KlEstimator = KlEstimator.K3
    use_bias_correction_kl: bool = False  # weigh KL_t by rho_t (DeepSeek-V3.2; TRL's flag)
    batch_tokens: float | None = None  # DAPO's normaliser when a batch is micro-batched


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kl: float  # token mean over the mask of the KL term as in the loss (0 with beta 0)
    clip_fraction: float  # share of the mask's tokens where clipping bit


def policy_loss(x: LossInputs, config: LossConfig) -> LossOutput:
    """J_GRPO (DeepSeekMath eq. 3) as a loss, term for term TRL's `_compute_loss`:

        rho_t = exp(log pi_theta(o_t) - log pi_old(o_t))
        l_t   = w_t * surrogate(rho_t, A_t) + beta * KL_t * (rho_t if use_bias_correction_kl)
        loss  = aggregate(l, mask)

    w_t are the truncated IS weights (1 without them). With the bias correction the KL term's
    gradient is that of KL(pi_theta || pi_ref) even off-policy; rho_t keeps its gradient, so it
    changes the update on policy too, where rho_t = 1.
    """
    loss_def = LOSS_TYPES[config.loss_type]
    ratio = torch.exp(log_ratio(x.logp, x.old_logp, x.mask))  # (N, T)
    per_token, clipped = loss_def.per_token(ratio, x.advantages, config.epsilon)  # (N, T)
    if x.is_weights is not None:
        per_token = per_token * x.is_weights
    tokens = x.mask.sum().clamp_min(1)
    kl_value = 0.0
    if config.beta > 0:
        if x.ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = KL_ESTIMATORS[config.kl_estimator](x.logp, x.ref_logp, x.mask)  # (N, T)
        if config.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + config.beta * kl
        kl_value = float((kl.detach() * x.mask).sum() / tokens)
    norms = Normalisers(config.max_len, config.batch_tokens)
    loss = loss_def.aggregate(per_token, x.mask, norms)
    return LossOutput(loss, kl_value, float((clipped * x.mask).sum() / tokens))
