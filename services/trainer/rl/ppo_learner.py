"""PPO's update of one generation batch: the critic beside the actor, GAE advantages, and
`ppo_epochs` passes over shuffled mini-batches (Schulman et al. 2017; the RLHF form of Ziegler
et al. 2019, Ouyang et al. 2022 and Huang et al. 2024, "The N+ Implementation Details of RLHF
with PPO"). The controller calls `learn` in place of the actor's own update; it stays the only
loop. Shapes as in `rl/batch.py`; the math is `ppo_algos` and `algos.clipped_surrogate`.

Per batch, with no gradient: log pi_old (the policy before this batch's first step), log pi_ref,
the critic's values V_old; the per-token rewards r_t = -kl_coef * (log pi_old - log pi_ref), plus
the score on the last token; GAE advantages and returns. Then, per mini-batch (each one
optimizer step of both models, accumulated over micro-batches of `micro_batch_size` sequences):

    loss = pg_loss - entropy_coef * entropy + vf_coef * vf_loss,

token means over the mini-batch, the gradient norm of policy and critic together clipped to
`max_grad_norm`, as TRL's PPO clips its policy-and-value model. A sample whose reward is not OK
has no token in the mask: it adds nothing, to any term or normaliser.

On several ranks (`rl/group.py`: every rank holds a replica of the actor and the critic) rank 0
sends each batch, its scores, kl_coef and the batch count (`PPO_LEARN`), and every rank runs
the same update on its share: the targets' forward passes are dealt by micro-batch and summed
over the ranks (each rank's rows, zeros elsewhere), so every rank holds the whole batch's
targets and computes the same GAE and whitening; each mini-batch's micro-batches are dealt
round-robin, each weighted by its share of the whole mini-batch's tokens (the global
normaliser), the gradients of actor and critic summed over the ranks before the joint clip
and step, and the statistics merged. The result is one process's up to the order of float
sums. `PPO_LOAD` restores the critic and the KL controller on every rank, from the resume
state's file.

Sharded (the plan's FSDP: the actor, its reference and the critic, each FSDP2 over the group),
every forward and backward pass is a collective: a rank short of micro-batches, in the targets
and in each mini-batch, runs one more pass with weight 0 (its rows dropped, its statistics not
counted), FSDP's reduce-scatter sums the gradients (no `reduce_gradients`), the joint clip
takes the norm over every rank's shards, and the critic's state is a sharded checkpoint beside
the actor's (`Critic.save_shards`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass, replace
from typing import Any

import torch

from services.trainer.rl import algos, ppo_algos
from services.trainer.rl.actor import Actor, Means, optimizer_step
from services.trainer.rl.batch import TokenBatch, Trajectories
from services.trainer.rl.critic import Critic
from services.trainer.rl.group import (
    ActorGroup,
    Command,
    Saved,
    batch_to,
    by_micro_batch,
    lead,
    share,
)


@dataclass(frozen=True, kw_only=True)
class PpoConfig:
    """The learner's settings, all from the job (`ppo.ppo_config`): the defaults live once, in
    `params.PpoParams`."""

    cliprange: float
    cliprange_value: float
    vf_coef: float
    gamma: float
    lam: float
    ppo_epochs: int
    num_mini_batches: int
    kl_coef: float
    target_kl: float  # 0: kl_coef fixed
    kl_horizon: int
    whiten_rewards: bool
    reward_clip: float
    whiten_advantages: bool
    entropy_coef: float
    micro_batch_size: int  # sequences per forward pass (0: a whole mini-batch)
    max_grad_norm: float  # 0: no clipping
    seed: int  # of the mini-batches' shuffles (with the batch's number)


@dataclass(frozen=True)
class Targets:
    """What the update reads per token, fixed for the batch. All (N, T), no gradient."""

    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, index: torch.Tensor | slice, width: int) -> Targets:
        return Targets(*(t[index, :width] for t in astuple(self)))


def select(batch: TokenBatch, index: torch.Tensor) -> TokenBatch:
    """The samples at `index` (a mini-batch), trimmed to their own longest sequence."""
    rows = index.tolist()
    prompt = [batch.prompt_lens[i] for i in rows]
    completion = [batch.completion_lens[i] for i in rows]
    length = max(p + c for p, c in zip(prompt, completion, strict=True))
    width = max(completion)
    index = index.to(batch.mask.device)
    return replace(
        batch,
        input_ids=batch.input_ids[index, :length],
        attention_mask=batch.attention_mask[index, :length],
        prompt_lens=prompt,
        completion_lens=completion,
        sampling_logp=batch.sampling_logp[index, :width],
        mask=batch.mask[index, :width],
    )


class PpoLearner:
    """The critic, the KL controller and the update; its state goes in the resume state."""

    def __init__(self, critic: Critic, config: PpoConfig) -> None:
        self.critic, self.config = critic, config
        self.kl = ppo_algos.KlController(config.kl_coef, config.target_kl, config.kl_horizon)
        self.batches = 0  # batches learned: the shuffles' seed
        # Several ranks (`rl/group.py`): rank 0 sends each update to the others, which hold
        # replicas of the actor and critic; None: one process.
        self.group: ActorGroup | None = None

    def targets(self, actor: Actor, batch: TokenBatch, scores: torch.Tensor) -> tuple[Targets, Any]:
        """log pi_old, V_old, the KL-penalised rewards, GAE advantages and returns; and the
        per-token KL (N, T). scores: (N,), NaN where not OK. No gradient."""
        c, mask = self.config, batch.mask
        fns: list[Callable[[TokenBatch], torch.Tensor]] = [actor.logprobs, self.critic.values]
        if c.kl_coef > 0:
            fns.append(actor.reference_logprobs)
        # In a group each rank runs its micro-batches, summed over the ranks: the whole batch's.
        # Sharded, a rank short of micro-batches runs one more pass (FSDP's collectives).
        old, values, *ref = by_micro_batch(
            fns, batch, c.micro_batch_size, self.group, padded=actor.sharded
        )  # (N, T)
        values = values * mask
        kl = (old - (ref[0] if ref else old)) * mask  # (N, T) k1: Ziegler et al. 2019's
        scores = scores.to(mask.device)  # (N,) NaN where not OK: those rows are masked
        rewards = ppo_algos.token_rewards(scores, kl, mask, self.kl.value, c.reward_clip)
        if c.whiten_rewards:
            rewards = ppo_algos.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_algos.gae(rewards, values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = ppo_algos.masked_whiten(advantages, mask)
        return Targets(old, values, advantages, returns), kl

    def learn(self, actor: Actor, batch: TokenBatch, t: Trajectories) -> dict[str, float]:
        """ppo_epochs passes over shuffled mini-batches; the batch's metrics."""
        return self.train(actor, batch, t.rewards())

    def train(self, actor: Actor, batch: TokenBatch, scores: torch.Tensor) -> dict[str, float]:
        """`learn` on the batch's scores (N,): what every rank of a group runs."""
        with lead(self.group, Command.PPO_LEARN, batch, scores, self.kl.value, self.batches):
            return self._train(actor, batch, scores)

    def _train(self, actor: Actor, batch: TokenBatch, scores: torch.Tensor) -> dict[str, float]:
        assert actor.scheduler is not None and self.critic.scheduler is not None
        c, mask = self.config, batch.mask
        targets, kl = self.targets(actor, batch, scores)
        kl_coef = self.kl.value
        before = {
            "kl": float(ppo_algos.masked_mean(kl, mask)),
            "kl_coef": kl_coef,
            "explained_variance": ppo_algos.explained_variance(
                targets.old_values, targets.returns, mask
            ),
            "returns_mean": float(ppo_algos.masked_mean(targets.returns, mask)),
            "values_mean": float(ppo_algos.masked_mean(targets.old_values, mask)),
            # As GRPO reports it: ~0 right after a sync at temperature 1 (the same weights).
            "logprob_mismatch": float(
                ppo_algos.masked_mean((targets.old_logp - batch.sampling_logp).abs(), mask)
            ),
            "learning_rate": float(actor.scheduler.get_last_lr()[0]),
            "critic_learning_rate": float(self.critic.scheduler.get_last_lr()[0]),
        }
        stats, grad_norm = Means(), 0.0
        generator = torch.Generator().manual_seed(c.seed + self.batches)
        for epoch in range(c.ppo_epochs):
            order = torch.randperm(len(batch), generator=generator)
            for index in order.chunk(c.num_mini_batches):
                grad_norm = self._mini_batch(actor, batch, targets, index, stats, epoch == 0)
        if self.group is not None:
            stats.sums, stats.weights = self.group.merge_means(stats.sums, stats.weights)
        rows = mask.sum(dim=1) > 0  # (N,) samples in the loss
        per_sample = (kl.sum(dim=1) / mask.sum(dim=1).clamp_min(1))[rows]  # token means
        self.kl.update(float(per_sample.mean()) if len(per_sample) else 0.0, int(rows.sum()))
        self.batches += 1
        return {**stats.means(), **before, "grad_norm": grad_norm}

    def follow(
        self, actor: Actor, batch: TokenBatch, scores: torch.Tensor, kl_coef: float, batches: int
    ) -> None:
        """A follower rank's `PPO_LEARN`: rank 0's batch with rank 0's kl_coef and count."""
        self.kl.value, self.batches = kl_coef, batches
        self.train(actor, batch_to(batch, actor.device), scores)

    def _mini_batch(
        self,
        actor: Actor,
        batch: TokenBatch,
        targets: Targets,
        index: torch.Tensor,
        stats: Means,
        first_epoch: bool,
    ) -> float:
        """One optimizer step of actor and critic on the samples at `index`."""
        assert actor.optimizer is not None and self.critic.optimizer is not None
        mini = select(batch, index)
        picked = targets.rows(index.to(batch.mask.device), mini.mask.shape[1])
        tokens = float(mini.mask.sum())
        actor.optimizer.zero_grad(set_to_none=True)
        self.critic.optimizer.zero_grad(set_to_none=True)
        n = len(mini)
        size = self.config.micro_batch_size or n
        group = self.group
        count = -(-n // size)
        # This rank's micro-batches (the others' are another rank's: the weights below are
        # shares of the whole mini-batch); a sharded rank short of them pads with the last one,
        # at weight 0 and without statistics.
        for micro_index in share(group, count, padded=actor.sharded):
            a = (count - 1 if micro_index is None else micro_index) * size
            micro = mini.rows(a, min(a + size, n))
            part = picked.rows(slice(a, a + len(micro)), micro.mask.shape[1])
            weight = float(micro.mask.sum()) / max(tokens, 1.0)  # token means add up
            if micro_index is None:
                self._accumulate(actor, micro, part, 0.0, Means(), first_epoch)
            else:
                self._accumulate(actor, micro, part, weight, stats, first_epoch)
        if group is not None and not actor.sharded:  # FSDP summed them in backward
            group.reduce_gradients(
                actor.trainable_parameters() + self.critic.trainable_parameters()
            )
        return optimizer_step([actor, self.critic], self.config.max_grad_norm)

    def _accumulate(
        self,
        actor: Actor,
        micro: TokenBatch,
        part: Targets,
        share: float,
        stats: Means,
        first_epoch: bool,
    ) -> None:
        """Forward and backward of one micro-batch, its token-mean losses weighted by its
        share of the mini-batch's tokens."""
        c, mask = self.config, micro.mask
        tokens = float(mask.sum())
        logp, entropy = actor.forward(micro, entropy_grad=c.entropy_coef > 0)  # (n, t) each
        ratio = torch.exp(algos.log_ratio(logp, part.old_logp, mask))  # (n, t)
        per_token_loss, clipped = algos.clipped_surrogate(ratio, part.advantages, c.cliprange)
        mean_entropy = ppo_algos.masked_mean(entropy, mask)
        policy_loss = ppo_algos.masked_mean(per_token_loss, mask) - c.entropy_coef * mean_entropy
        value = ppo_algos.value_loss(
            self.critic.values(micro), part.old_values, part.returns, mask, c.cliprange_value
        )
        assert actor.scaler is not None and self.critic.scaler is not None
        actor.scaler.scale(policy_loss * share).backward()
        self.critic.scaler.scale(c.vf_coef * value.loss * share).backward()
        log_ratio = (logp.detach() - part.old_logp) * mask  # (n, t)
        low = ((ratio < 1 - c.cliprange) & (part.advantages < 0)).float()  # (n, t)
        values: dict[str, torch.Tensor | float] = {
            "loss": policy_loss,
            "value_loss": value.loss,
            "value_clip_fraction": value.clip_fraction,
            "clip_ratio/low": ppo_algos.masked_mean(low, mask),
            "clip_ratio/high": ppo_algos.masked_mean(clipped - low, mask),
            "clip_ratio/region": ppo_algos.masked_mean(clipped, mask),
            # Schulman 2020's k2, TRL's PPO `approxkl`: how far the epochs moved the policy.
            "approx_kl": 0.5 * ppo_algos.masked_mean(log_ratio**2, mask),
        }
        if first_epoch:  # before most of the batch's steps, as GRPO reports it
            values["entropy"] = mean_entropy
        for name, x in values.items():
            stats.add(name, float(x.detach()) if isinstance(x, torch.Tensor) else x, tokens)

    def state_dict(self) -> dict[str, Any]:
        """The critic's weights, optimizer, schedule and scaler; kl_coef; the batch count."""
        return {
            "critic": self.critic.state_dict(),
            "kl_coef": self.kl.value,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any], saved: Saved | None = None) -> None:
        """The learner's resume state; in a group rank 0 sends `saved`, where it read `state`
        (file and entry), and every rank reads it there."""
        if self.group is not None and self.group.rank == 0 and saved is None:
            raise ValueError("a group resumes from a state file: pass where it was read")
        self.critic.check_loadable(state["critic"])  # before any collective
        with lead(self.group, Command.PPO_LOAD, *(saved or ())):
            self.critic.load_state_dict(state["critic"])
            self.kl.value, self.batches = state["kl_coef"], state["batches"]
