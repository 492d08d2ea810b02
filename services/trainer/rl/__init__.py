"""The online-RL engine (ARCHITECTURE.md, "trainer"): `algos` holds the pure tensor math.

The option names live here, free of torch, so that spec validation (which runs in the service
process, where torch is never imported) and the math share one enum per concept: the tables in
`algos` are keyed by these, and `spec.py` accepts exactly their values.
"""

from __future__ import annotations

import enum


class AdvantageEstimator(enum.StrEnum):
    """How rewards become advantages (`algos.ADVANTAGE_ESTIMATORS`)."""

    GRPO = "grpo"  # group-relative outcome advantages (Shao et al. 2024)
    RLOO = "rloo"  # leave-one-out baseline (Ahmadian et al. 2024)
    REINFORCE_PP = "reinforce_pp"  # REINFORCE++-baseline: batch-whitened returns (Hu 2025)


# The estimators whose KL penalty (`beta`) is in the reward, not in the loss: the reward of a
# sample (RLOO) or of each token (REINFORCE++) is lowered by beta x KL_t before the baseline.
KL_IN_REWARD = frozenset({AdvantageEstimator.RLOO, AdvantageEstimator.REINFORCE_PP})


class ScaleRewards(enum.StrEnum):
    """What a GRPO advantage is divided by (TRL's `scale_rewards`)."""

    GROUP = "group"  # the std of its group's rewards (DeepSeekMath)
    BATCH = "batch"  # the std of the whole batch's rewards (Liu et al. 2025, "Lite PPO")
    NONE = "none"  # nothing: r - mean(group) (Liu et al. 2025, Dr. GRPO)


class LossType(enum.StrEnum):
    """A policy loss and how its per-token values become a scalar (`algos.LOSS_TYPES`)."""

    GRPO = "grpo"  # mean over samples of each sample's token mean (DeepSeekMath eq. 3)
    DR_GRPO = "dr_grpo"  # token sum / (samples x max completion length) (Liu et al. 2025)
    DAPO = "dapo"  # token sum / loss tokens of the whole generation batch (Yu et al. 2025)
    BNPO = "bnpo"  # token sum / loss tokens of this (micro-)batch (TRL's "bnpo")


class KlEstimator(enum.StrEnum):
    """Per-token estimators of KL(pi_theta || pi_ref) (Schulman 2020, `algos.KL_ESTIMATORS`)."""

    K1 = "k1"  # log pi_theta - log pi_ref: unbiased, can be negative (PPO's KL-in-reward)
    K2 = "k2"  # (log pi_theta - log pi_ref)^2 / 2: biased, never negative, low variance
    K3 = "k3"  # exp(d) - d - 1, d = log pi_ref - log pi_theta: unbiased, never negative


# The estimators a KL penalty in the reward may use (OpenRLHF's `compute_approx_kl`; REINFORCE++
# names k1 and k2, Hu 2025). k3 stays GRPO's, in the loss.
REWARD_KL_ESTIMATORS = (KlEstimator.K1, KlEstimator.K2)
