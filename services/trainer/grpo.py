"""GRPO (Shao et al. 2024) as a recipe over the online-RL engine (`services/trainer/rl/`):
setup (actor, ports, controller) / train / save / cleanup, as torchtune's recipes. `run(ctx)`
is the worker's entry point.

This module only maps the job's spec onto the engine: GRPO is the `grpo` advantage estimator,
the clipped loss of `loss_type` with a KL penalty of `beta`, and truncated importance sampling
(`rloo` and `reinforce_pp` swap the estimator and move `beta`'s KL into the reward);
B = `per_device_batch_size` x `gradient_accumulation_steps` prompts per step, G =
`num_generations` samples each, trained `per_device_batch_size` prompts (x G sequences) per
forward pass with the gradients of a step accumulated. The loop is `rl/controller.py`, with
`max_policy_lag` 1 asynchronous; every service call goes through an outage guard
(`rl/outage.py`), so a service that is down makes the job wait, up to the trainer's
`outage_timeout_s`. On several devices rank 0 runs this recipe and the other ranks follow its
actor (`rl/group.py`), a replica on each rank, or a shard when the plan's strategy is FSDP.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from services.common.errors import FailedPrecondition
from services.trainer.rl import (
    KL_IN_REWARD,
    AdvantageEstimator,
    KlEstimator,
    LossType,
    ScaleRewards,
    algos,
)
from services.trainer.rl.actor import Actor, Objective, build_actor
from services.trainer.rl.controller import Controller, ControllerConfig, Learner
from services.trainer.rl.group import ActorGroup, Command, Follower, follow, open_group
from services.trainer.rl.grpc_ports import GrpcPorts, GrpcPromptSource, open_ports
from services.trainer.rl.outage import (
    Endpoint,
    GuardedPrompts,
    GuardedPublisher,
    GuardedSampler,
    GuardedScorer,
    OutageGuard,
    guarded_upload,
)
from services.trainer.rl.ports import PolicyRef
from services.trainer.rl.weight_sync import PushPublisher, WeightPusher
from services.trainer.spec import GrpoParams, JobSpec
from services.trainer.worker_io import Cancelled, WorkerContext
from services.trainer.worker_protocol import CHECKPOINTS


def kl_in_reward(params: GrpoParams) -> bool:
    """RLOO and REINFORCE++ put beta's KL in the reward; GRPO in the loss."""
    return AdvantageEstimator(params.advantage_estimator) in KL_IN_REWARD


def loss_config(params: GrpoParams) -> algos.LossConfig:
    return algos.LossConfig(
        loss_type=LossType(params.loss_type),
        max_len=params.sampling.max_tokens,
        epsilon=params.epsilon,
        beta=0.0 if kl_in_reward(params) else params.beta,
        use_bias_correction_kl=params.use_bias_correction_kl,
    )


def objective(params: GrpoParams, micro_batch_size: int = 0) -> Objective:
    """How a batch trains: `micro_batch_size` sequences per forward pass (0: all)."""
    return Objective(
        loss=loss_config(params),
        num_iterations=params.num_iterations,
        micro_batch_size=micro_batch_size,
        is_correction=params.importance_sampling_correction,
        is_cap=params.importance_sampling_cap,
    )


def device_of(plan: dict[str, Any]) -> str:
    return "cuda" if plan.get("device_type") == "cuda" else "cpu"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a model of the online loop (the actor, PPO's critic) is built and trains. Sharded
    (FSDP), only rank 0 reads the weights, into host memory, and each layer moves to its device
    as it is sharded (no device holds the whole model); the other ranks build it on "meta" and
    get their shards from rank 0 (`distributed.shard_from_rank0`)."""

    device: str  # where it trains
    built_on: str  # where it is built: `device`, or sharded "cpu" (rank 0) or "meta"
    sharded: bool

    @staticmethod
    def of(plan: dict[str, Any], group: ActorGroup | None) -> Placement:
        device = device_of(plan)
        if group is None or plan.get("strategy") != "fsdp":
            return Placement(device, device, False)
        return Placement(device, "cpu" if group.rank == 0 else "meta", True)


def prompts_per_step(spec: JobSpec, devices: int = 1) -> int:
    """B, the prompts of a step: per device x accumulation steps x devices, as TRL's global
    batch (a group of `devices` ranks shares each step's micro-batches)."""
    t = spec.training
    return t.per_device_batch_size * t.gradient_accumulation_steps * devices


def controller_config(
    spec: JobSpec, total_steps: int, tag: str, devices: int = 1
) -> ControllerConfig:
    params: GrpoParams = spec.params
    t = spec.training
    seed = params.sampling.seed if params.sampling.seed is not None else t.seed
    return ControllerConfig(
        total_steps=total_steps,
        prompts_per_step=prompts_per_step(spec, devices),
        group_size=params.num_generations,
        sampling=dataclasses.replace(params.sampling, seed=seed),
        # A forward pass holds `per_device_batch_size` prompts' G sequences.
        objective=objective(params, t.per_device_batch_size * params.num_generations),
        advantage=AdvantageEstimator(params.advantage_estimator),
        scale_rewards=ScaleRewards(params.scale_rewards),
        kl_in_reward=params.beta if kl_in_reward(params) else 0.0,
        kl_estimator=KlEstimator(params.kl_estimator),
        sync_every=params.sync_every,
        save_every=t.save_every,
        log_every=t.log_every,
        eval_every=t.eval_every,
        max_policy_lag=params.max_policy_lag,
        tag=tag,
    )


class WorkerReporter:
    """The controller's events, as the worker's events file carries them."""

    def __init__(self, ctx: WorkerContext, prompts_per_step: int, row_count: int) -> None:
        self.ctx, self.size, self.rows = ctx, prompts_per_step, row_count

    def metrics(self, step: int, values: dict[str, float]) -> None:
        epoch = step * self.size / max(self.rows, 1)
        self.ctx.events.emit("metrics", step=step, epoch=epoch, values=values)

    def checkpoint(self, step: int, policy: PolicyRef) -> None:
        self.ctx.events.emit("checkpoint", step=step, policy_revision=policy.version)

    def samples(self, step: int, shown: list[dict[str, Any]]) -> None:
        self.ctx.log(f"samples at step {step}: {json.dumps(shown, ensure_ascii=False)}")

    def log(self, message: str, level: str = "info") -> None:
        self.ctx.log(message, level)

    def check_stop(self) -> None:
        self.ctx.check_stop()


class GrpoRecipe:
    """setup / train / cleanup of one job; the result is the last published policy. In a
    group (`rl/group.py`) this runs on rank 0 and the other ranks follow its actor."""

    def __init__(self, ctx: WorkerContext, group: ActorGroup | None = None) -> None:
        self.ctx, self.spec, self.group = ctx, ctx.spec, group
        self.ports: GrpcPorts | None = None
        self.pusher: WeightPusher | None = None
        self.controller: Controller | None = None

    async def setup(self) -> int:
        ctx, spec, t, job = self.ctx, self.spec, self.spec.training, self.ctx.job
        guard = OutageGuard(job.outage_timeout_s, ctx.log, ctx.check_stop, seed=t.seed)
        registry = Endpoint("registry", job.registry_address)
        rollout = Endpoint("rollout", job.rollout_address)
        reward = Endpoint("reward", job.reward_address)
        source = GrpcPromptSource(ctx.registry, ctx.team, spec.train_dataset, t.seed)
        prompts = GuardedPrompts(source, guard, registry)
        if await prompts.open() == 0:
            raise FailedPrecondition(f"{spec.train_dataset} has no rows")
        size = prompts_per_step(spec, self.devices)
        total = t.max_steps or max(1, math.ceil(t.epochs * source.row_count / size))
        eval_rows = []
        if spec.eval_dataset:
            evals = GrpcPromptSource(ctx.registry, ctx.team, spec.eval_dataset, 0)
            eval_rows = await GuardedPrompts(evals, guard, registry).read()
        base = await guard.call(registry, ctx.base_model)
        plan = ctx.job.device_plan
        tokenizer = AutoTokenizer.from_pretrained(base)
        pad = tokenizer.pad_token_id
        if self.group is not None:
            self.group.announce(Command.SETUP, str(base), total)
        actor = self._actor(base, plan, total)
        job_id = job.name.removeprefix("jobs/")
        self.ports = ports = open_ports(
            ctx.job.rollout_address,
            ctx.job.reward_address,
            spec.evaluator,
            ctx.api_key,
            ctx.team,
            # The correction compares the rollout's log-probs with the actor's, which are at the
            # sampling temperature: ask the rollout for the same numbers.
            scaled_logprobs=self.scaled_logprobs(),
        )
        lora = spec.lora is not None
        upload = guarded_upload(
            lambda folder, rid: ctx.upload(folder, lora, request_id=rid), guard, registry
        )
        # Syncs push to every rollout replica; the registry gets checkpoints and the end.
        self.pusher = WeightPusher(job.rollout_address, ports.rollout.metadata())
        gathered = actor.gathered if actor.sharded else None
        config = self.controller_config(total)
        publisher = PushPublisher.for_job(
            self.pusher, upload, actor.model, spec, job_id, total, gathered,
            keep_pushed=config.trains_while_served,
        )  # fmt: skip
        self.controller = Controller(
            config,
            actor,
            prompts,
            GuardedSampler(ports.sampler, guard, rollout),
            GuardedScorer(ports.scorer, guard, reward),
            GuardedPublisher(publisher, guard, rollout),
            WorkerReporter(ctx, size, source.row_count),
            ctx.folder,
            pad_id=int(pad if pad is not None else 0),
            tokenizer=tokenizer,
            eval_rows=eval_rows,
            learner=await self.learner(plan, total),
        )
        start = await self.controller.start()
        if start:
            ctx.log(f"resumed at step {start} from {self.controller.policy.version}")
        ctx.events.emit("started", total_steps=total)
        method = spec.method.name
        ctx.log(f"{method}: {source.row_count} prompts, {total} steps of {size} prompts")
        return total

    def _actor(self, base: Any, plan: dict[str, Any], total_steps: int) -> Actor:
        """The actor, the same on every rank; sharded over the group when the plan says FSDP
        (`rl/group.py`), its checkpoints in the job's folder."""
        where = Placement.of(plan, self.group)
        actor = build_actor(base, self.spec, plan["precision"], where.built_on)
        actor.group = self.group
        actor.checkpoints = self.ctx.folder / CHECKPOINTS
        if where.sharded:
            actor.shard(where.device)
        updates = total_steps * self.updates_per_step()
        actor.configure_optimizer(self.spec, plan["precision"], updates)
        return actor

    @property
    def devices(self) -> int:
        return self.group.size if self.group is not None else 1

    # What another online method changes (`ppo.PpoRecipe`) ----------------------------------

    def controller_config(self, total_steps: int) -> ControllerConfig:
        return controller_config(self.spec, total_steps, self.ctx.job.name, self.devices)

    def updates_per_step(self) -> int:
        """Optimizer steps of the actor per generation batch."""
        params: GrpoParams = self.spec.params
        return params.num_iterations

    def scaled_logprobs(self) -> bool:
        """Whether the rollout returns log-probs at the sampling temperature."""
        params: GrpoParams = self.spec.params
        return params.importance_sampling_correction

    async def learner(self, plan: dict[str, Any], total_steps: int) -> Learner | None:
        """What trains in place of the actor's own update (PPO's critic); GRPO has none."""
        return None

    def follower_setup(self, actor: Actor, total_steps: int) -> Follower | None:
        """A follower rank, once its actor is built: what its commands run on, with what else
        rank 0 builds (PPO's critic). None when rank 0 stopped first."""
        return Follower(actor)

    async def train(self) -> dict[str, float]:
        assert self.controller is not None, "setup first"
        return await self.controller.run()

    @property
    def output(self) -> str:
        """The last published policy: the job's output revision."""
        return self.controller.policy.version if self.controller else ""

    async def cleanup(self) -> None:
        if self.ports is not None:
            await self.ports.close()
        if self.pusher is not None:
            await self.pusher.close()


async def run(ctx: WorkerContext, recipe_type: type[GrpoRecipe] = GrpoRecipe) -> dict[str, Any]:
    """The job (`recipe_type`: GRPO's, or another online method's: `ppo.PpoRecipe`)."""
    group = open_group(device_of(ctx.job.device_plan))  # None: one process
    if group is not None and group.rank != 0:
        follower(ctx, group, recipe_type)
        return {"output_model_revision": "", "metrics": {}}  # rank 0 reports the result
    recipe = recipe_type(ctx, group)
    try:
        await recipe.setup()
        metrics = await recipe.train()
    except Cancelled:
        if group is not None:
            group.stop()
        raise
    finally:
        await recipe.cleanup()
    if group is not None:
        group.stop()
    return {"output_model_revision": recipe.output, "metrics": metrics}


def follower(
    ctx: WorkerContext, group: ActorGroup, recipe_type: type[GrpoRecipe] = GrpoRecipe
) -> None:
    """A rank other than 0: the same actor as rank 0's, built from the base and step count it
    sends, then its commands until it stops (`rl/group.py`)."""
    command, *args = group.receive()
    if command != Command.SETUP:
        group.close()
        return  # rank 0 stopped before it built its actor
    base, total = args
    recipe = recipe_type(ctx, group)
    actor = recipe._actor(Path(base), ctx.job.device_plan, total)
    context = recipe.follower_setup(actor, total)
    if context is not None:
        follow(context, group)
