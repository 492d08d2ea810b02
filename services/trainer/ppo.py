"""PPO (Schulman et al. 2017, in its RLHF form: Ouyang et al. 2022; Huang et al. 2024) as a
recipe over the online-RL engine: GRPO's recipe (`grpo.py`: prompts, ports, actor, publisher,
the controller) with a critic beside the actor. `run(ctx)` is the worker's entry point.

This module only maps the job's spec onto the engine: B = `per_device_batch_size` x
`gradient_accumulation_steps` prompts per step, `sampling.n` samples each; the controller's
update is `rl/ppo_learner.py`'s (GAE over the critic's values, `ppo_epochs` x
`num_mini_batches` optimizer steps of actor and critic per batch), `per_device_batch_size`
prompts (x n sequences) per forward pass. The critic starts from `critic_model` (a reward
model's head becomes its value head) or from the base with a new head.

On several devices (a torchrun group, `rl/group.py`) PPO runs as GRPO does: every rank holds
a replica of the actor and the critic (DDP), or, when the plan's strategy is FSDP, 1/N of the
actor, of its reference and of the critic (FSDP2; their checkpoints sharded, the published
policy gathered to rank 0). Rank 0 runs the controller, sends the critic's folder after the
actor's (a second SETUP) and each batch to learn, and every rank trains its share of each
mini-batch (`rl/ppo_learner.py`); B is then `per_device_batch_size` x
`gradient_accumulation_steps` x devices prompts per step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from services.trainer import grpo
from services.trainer.grpo import GrpoRecipe, Placement, prompts_per_step
from services.trainer.rl import LossType, algos
from services.trainer.rl.actor import Actor, Objective
from services.trainer.rl.controller import ControllerConfig
from services.trainer.rl.critic import build_critic
from services.trainer.rl.group import Command, Follower
from services.trainer.rl.ppo_learner import PpoConfig, PpoLearner
from services.trainer.spec import JobSpec, PpoParams
from services.trainer.worker_io import WorkerContext
from services.trainer.worker_protocol import CHECKPOINTS


def micro_batch_size(spec: JobSpec) -> int:
    """Sequences per forward pass: `per_device_batch_size` prompts' n samples."""
    params: PpoParams = spec.params
    return spec.training.per_device_batch_size * params.sampling.n


def ppo_config(spec: JobSpec) -> PpoConfig:
    p: PpoParams = spec.params
    return PpoConfig(
        cliprange=p.cliprange,
        cliprange_value=p.cliprange_value,
        vf_coef=p.vf_coef,
        gamma=p.gamma,
        lam=p.lam,
        ppo_epochs=p.ppo_epochs,
        num_mini_batches=p.num_mini_batches,
        kl_coef=p.kl_coef,
        target_kl=p.target_kl,
        kl_horizon=p.kl_horizon,
        whiten_rewards=p.whiten_rewards,
        reward_clip=p.reward_clip,
        whiten_advantages=p.whiten_advantages,
        entropy_coef=p.entropy_coef,
        micro_batch_size=micro_batch_size(spec),
        max_grad_norm=spec.training.max_grad_norm,
        seed=spec.training.seed,
    )


def controller_config(
    spec: JobSpec, total_steps: int, tag: str, devices: int = 1
) -> ControllerConfig:
    """The loop's settings (`devices` ranks share each step); `objective` is the actor's own
    update, which PPO's learner replaces (its clipped token-mean loss, for the record)."""
    params: PpoParams = spec.params
    t = spec.training
    seed = params.sampling.seed if params.sampling.seed is not None else t.seed
    loss = algos.LossConfig(LossType.BNPO, params.sampling.max_tokens, params.cliprange)
    return ControllerConfig(
        total_steps=total_steps,
        prompts_per_step=prompts_per_step(spec, devices),
        group_size=params.sampling.n,
        sampling=dataclasses.replace(params.sampling, seed=seed),
        objective=Objective(loss, micro_batch_size=micro_batch_size(spec)),
        sync_every=params.sync_every,
        save_every=t.save_every,
        log_every=t.log_every,
        eval_every=t.eval_every,
        tag=tag,
    )


class PpoRecipe(GrpoRecipe):
    """GRPO's setup / train / cleanup with PPO's controller settings and learner."""

    def controller_config(self, total_steps: int) -> ControllerConfig:
        return controller_config(self.spec, total_steps, self.ctx.job.name, self.devices)

    def updates_per_step(self) -> int:
        params: PpoParams = self.spec.params
        return params.ppo_epochs * params.num_mini_batches

    def scaled_logprobs(self) -> bool:
        return True  # logprob_mismatch compares them with the actor's, at the same temperature

    async def learner(self, plan: dict[str, Any], total_steps: int) -> PpoLearner:
        params: PpoParams = self.spec.params
        path = await self._critic_weights()
        if self.group is not None:  # the followers build the same critic (`follower_setup`)
            self.group.announce(Command.SETUP, str(path))
        learner = self._learner(path, plan, total_steps)
        self.ctx.log(f"critic from {params.critic_model or self.spec.base_model}")
        return learner

    def _learner(self, path: Path, plan: dict[str, Any], total_steps: int) -> PpoLearner:
        params: PpoParams = self.spec.params
        where = Placement.of(plan, self.group)
        critic = build_critic(path, self.spec, plan["precision"], where.built_on)
        critic.group = self.group
        critic.checkpoints = self.ctx.folder / CHECKPOINTS  # beside the actor's shards
        if where.sharded:
            critic.shard(where.device)
        rate = params.critic_learning_rate or self.spec.training.learning_rate or 0.0
        updates = total_steps * self.updates_per_step()
        critic.configure_optimizer(self.spec, rate, plan["precision"], updates)
        learner = PpoLearner(critic, ppo_config(self.spec))
        learner.group = self.group
        return learner

    def follower_setup(self, actor: Actor, total_steps: int) -> Follower | None:
        """The actor and the critic, from the folder rank 0 sends once it resolved it."""
        assert self.group is not None
        command, *args = self.group.receive()
        if command != Command.SETUP:
            self.group.close()
            return None  # rank 0 stopped before it built its critic
        (path,) = args
        return Follower(actor, self._learner(Path(path), self.ctx.job.device_plan, total_steps))

    async def _critic_weights(self) -> Path:
        params: PpoParams = self.spec.params
        return await self.ctx.model(params.critic_model or self.spec.base_model)


async def run(ctx: WorkerContext) -> dict[str, Any]:
    return await grpo.run(ctx, PpoRecipe)  # one process, or rank 0 of a group and followers
