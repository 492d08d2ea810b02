"""GRPO (Shao et al. 2024): the trainer's own single-controller loop, run in the job's worker.

One step (ARCHITECTURE.md, "Flow of one GRPO step"): B prompt rows from the registry ->
rollout `Generate` (G samples each, the current policy revision) -> reward `Score` -> group
advantages -> recompute the policy's per-token log-probs on prompt + completion -> mu updates
of the clipped loss + beta * KL -> every `sync_every` steps the policy goes to the registry as
a new revision and the rollout service loads it. The math is in `rl/algos.py`.

A run is setup / train (step, sync) / cleanup. As TRL's GRPOTrainer: the trainer's log-probs are
log_softmax(logits / sampling temperature) (before top-k/top-p); log pi_old is the trainer's own,
before the batch's first update; the rollout's log-probs are the sampler's, used only by the
truncated importance-sampling correction. Dropout is off (eval mode).
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from peft import LoraConfig, get_peft_model
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from services.common.client import call_metadata
from services.common.errors import FailedPrecondition
from services.trainer.convert import sampling_to_proto
from services.trainer.rl import AdvantageEstimator, LossType, ScaleRewards, algos
from services.trainer.rl_roles import (
    PromptBatches,
    RewardRole,
    Rollout,
    RolloutRole,
    adapter_missing,
)
from services.trainer.spec import ALL_LINEAR, GrpoParams, JobSpec
from services.trainer.worker_io import Cancelled, WorkerContext, check_lora_targets
from services.trainer.worker_protocol import CHECKPOINTS, POLICY
from tlm.reward.v1 import reward_service_pb2 as rs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
STATE_FILE = "grpo-state.pt"  # under checkpoints/: the resume point, written at each sync


class PolicyLost(FailedPrecondition):
    """The rollout service no longer serves the policy the trainer is training."""


@dataclass
class Batch:
    """One step's sequences: prompt + completion, right-padded."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    prompt_lens: list[int]  # (N,)
    completion_lens: list[int]  # (N,)
    sampling_logp: torch.Tensor  # (N, T) the rollout's log-probs (temperature 1, raw)
    mask: torch.Tensor  # (N, T) real completion tokens of samples with a reward


def make_batch(
    rollouts: list[Rollout], valid: torch.Tensor, pad_id: int, device: str | torch.device = "cpu"
) -> Batch:
    """Right-padded prompt + completion on the policy's device. Right padding keeps every real
    token at positions 0..len-1, so the model's default position ids are the rollout's."""
    for i, r in enumerate(rollouts):
        if len(r.logprobs) != len(r.completion_ids):  # padding would misalign them
            raise RuntimeError(
                f"rollout sample {i} has {len(r.logprobs)} log-probs for "
                f"{len(r.completion_ids)} tokens"
            )
    seqs = [torch.tensor(r.prompt_ids + r.completion_ids) for r in rollouts]
    input_ids = pad_sequence(seqs, batch_first=True, padding_value=pad_id)  # (N, L)
    attention = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)  # (N, L)
    sampled = [torch.tensor(r.logprobs, dtype=torch.float32) for r in rollouts]
    sampling_logp = pad_sequence(sampled, batch_first=True)  # (N, T)
    present = pad_sequence([torch.ones(len(r.completion_ids)) for r in rollouts], batch_first=True)
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        prompt_lens=[len(r.prompt_ids) for r in rollouts],
        completion_lens=[len(r.completion_ids) for r in rollouts],
        sampling_logp=sampling_logp.to(device),
        mask=(present * valid.unsqueeze(1).float()).to(device),  # (N, T)
    )


def completion_logprobs(model: Any, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of each completion token under softmax(logits / temperature).

    Returns (N, T), zero-padded past each completion."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits  # (N, L, V)
    rows = []
    for i, (p, c) in enumerate(zip(batch.prompt_lens, batch.completion_lens, strict=True)):
        step_logits = logits[i, p - 1 : p - 1 + c]  # (C_i, V): position t predicts t+1
        targets = batch.input_ids[i, p : p + c]  # (C_i,)
        rows.append(algos.token_logprobs(step_logits, targets, temperature))  # (C_i,)
    return pad_sequence(rows, batch_first=True)  # (N, T)


@dataclass
class Policy:
    """The trained model and how to get its reference: the base with the LoRA adapter off, or
    a frozen copy of the base for full tuning (None when beta is 0). `autocast` is the 16-bit
    compute dtype (None: fp32): the trained weights stay fp32 masters under it. Log-probs are
    at the sampling `temperature`."""

    model: Any
    reference: Any | None
    lora: bool
    autocast: torch.dtype | None = None
    temperature: float = 1.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _compute(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def logprobs(self, batch: Batch) -> torch.Tensor:
        with self._compute():
            return completion_logprobs(self.model, batch, self.temperature)

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        with self._compute():
            if self.lora:
                with self.model.disable_adapter():
                    return completion_logprobs(self.model, batch, self.temperature)
            return completion_logprobs(self.reference, batch, self.temperature)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def build_policy(path: Any, spec: JobSpec, precision: str, device: str) -> Policy:
    """LoRA loads the frozen base in `precision` (peft keeps the adapters fp32); full tuning
    loads fp32 weights and autocasts to a 16-bit precision, since 16-bit weights round small
    updates (lr 1e-6 x Adam's ~1 step) away. The frozen reference needs no master copy."""
    torch.manual_seed(spec.training.seed)  # LoRA's A matrices
    compute = DTYPES[precision]
    autocast = compute if compute != torch.float32 else None
    weights = compute if spec.lora is not None else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=weights)
    model = model.to(torch.device(device))
    check_lora_targets(spec, model)
    params: GrpoParams = spec.params
    temperature = params.sampling.temperature
    if spec.lora is None:
        reference = None
        if params.beta:
            reference = copy.deepcopy(model).to(compute).eval().requires_grad_(False)
        return Policy(model.eval(), reference, False, autocast, temperature)
    lora = spec.lora
    targets = ALL_LINEAR if ALL_LINEAR in lora.target_modules else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return Policy(get_peft_model(model, config).eval(), None, True, autocast, temperature)


def batch_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, batch: Batch, params: GrpoParams
) -> torch.Tensor:
    """GRPO's group advantages on the batch's loss tokens. rewards, valid: (N,). Returns (N, T)."""
    device = batch.mask.device
    inputs = algos.AdvantageInputs(
        rewards.to(device), valid.to(device), params.num_generations, batch.mask
    )
    options = algos.AdvantageOptions(ScaleRewards(params.scale_rewards))
    return algos.ADVANTAGE_ESTIMATORS[AdvantageEstimator.GRPO](inputs, options)


def sampler_correction(
    old: torch.Tensor, batch: Batch, params: GrpoParams
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The truncated IS weights (None when off), and how far the trainer's log pi_old is from
    the rollout's log-probs: ~0 right after a sync at temperature 1 (same weights)."""
    mask, tokens = batch.mask, batch.mask.sum().clamp_min(1)
    gap = (old - batch.sampling_logp).abs() * mask  # (N, T)
    metrics = {"logprob_mismatch": float(gap.sum() / tokens)}
    if not params.importance_sampling_correction:
        return None, metrics
    cap = params.importance_sampling_cap
    weights = algos.truncated_is_weights(old, batch.sampling_logp, mask, cap)  # (N, T)
    metrics["importance_ratio_mean"] = float((weights * mask).sum() / tokens)
    metrics["importance_ratio_max"] = float((weights * mask).max()) if mask.numel() else 0.0
    return weights, metrics


def loss_config(params: GrpoParams) -> algos.LossConfig:
    return algos.LossConfig(
        loss_type=LossType(params.loss_type),
        max_len=params.sampling.max_tokens,
        epsilon=params.epsilon,
        beta=params.beta,
        use_bias_correction_kl=params.use_bias_correction_kl,
    )


class GrpoRun:
    """setup / train / cleanup of one job; `policy_revision` is what the rollout serves."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx, self.spec = ctx, ctx.spec
        self.params: GrpoParams = ctx.spec.params
        metadata = call_metadata(ctx.api_key, ctx.team)
        self.rollout = RolloutRole(ctx.job.rollout_address, metadata)
        self.reward = RewardRole(ctx.job.reward_address, metadata, ctx.spec.evaluator)
        t = self.spec.training
        assert t.per_device_batch_size >= 1
        self.prompts = PromptBatches(
            ctx.registry, ctx.team, self.spec.train_dataset, t.per_device_batch_size, t.seed
        )
        self.policy_revision = ""  # empty: the base model, before the first sync
        self.start_step = 0

    # Setup -------------------------------------------------------------------------------

    async def setup(self) -> int:
        ctx, t = self.ctx, self.spec.training
        if await self.prompts.open() == 0:
            raise FailedPrecondition(f"{self.spec.train_dataset} has no rows")
        self.total_steps = self.prompts.total_steps(t.max_steps, t.epochs)
        base = await ctx.base_model()
        plan = ctx.job.device_plan
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.policy = build_policy(base, self.spec, plan["precision"], _device(plan))
        trainable = [p for p in self.policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=t.learning_rate or 0.0, weight_decay=t.weight_decay
        )
        updates = self.total_steps * self.params.num_iterations
        # fp16 autocast needs loss scaling or small gradients underflow (bf16 has fp32's range).
        self.scaler = torch.amp.GradScaler(
            self.policy.device.type, enabled=plan["precision"] == "fp16"
        )
        self.scheduler = get_scheduler(
            SCHEDULERS[t.lr_scheduler],
            self.optimizer,
            num_warmup_steps=math.ceil(t.warmup_ratio * updates),
            num_training_steps=updates,
        )
        self._resume()
        await self._serve()
        ctx.events.emit("started", total_steps=self.total_steps)
        ctx.log(f"GRPO: {self.prompts.row_count} prompts, {self.total_steps} steps")
        return self.total_steps

    def _resume(self) -> None:
        path = self.ctx.folder / CHECKPOINTS / STATE_FILE
        if not path.exists():
            return
        state = torch.load(path, weights_only=False)
        self.policy.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.start_step, self.policy_revision = state["step"], state["policy_revision"]
        self.ctx.log(f"resumed at step {self.start_step} from {self.policy_revision}")

    async def _serve(self) -> None:
        """Make the rollout service serve the current policy (base, then + adapter)."""
        full = not self.policy.lora and self.policy_revision
        await self.rollout.serve_model(self.policy_revision if full else self.spec.base_model)
        if self.policy.lora and self.policy_revision:
            await self.rollout.load_adapter(self.policy_revision)

    # Train -------------------------------------------------------------------------------

    async def train(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        started = time.monotonic()
        for step in range(self.start_step, self.total_steps):
            self.ctx.check_stop()
            metrics = await self.step(step)
            done = step + 1
            if done % self.spec.training.log_every == 0 or done == self.total_steps:
                epoch = done * self.prompts.size / self.prompts.row_count
                self.ctx.events.emit("metrics", step=done, epoch=epoch, values=metrics)
            if done % self.params.sync_every == 0 or done == self.total_steps:
                await self.sync(done)
        return metrics | {"train_runtime": time.monotonic() - started}

    async def step(self, step: int) -> dict[str, float]:
        t0 = time.monotonic()
        rows = await self.prompts.batch(step)
        rollouts = await self._generate(rows, step)
        t1 = time.monotonic()
        scored = await self.reward.score(rows, rollouts, tag=f"{self.ctx.job.name}-s{step}")
        t2 = time.monotonic()
        rewards = torch.tensor([r for _, r in scored], dtype=torch.float32)  # (N,)
        valid = torch.tensor([s == rs.OK for s, _ in scored])  # (N,)
        batch = make_batch(rollouts, valid, self.pad_id, self.policy.device)
        update = self.update(batch, batch_advantages(rewards, valid, batch, self.params))
        t3 = time.monotonic()
        tokens = sum(batch.completion_lens)
        ok = rewards[valid]
        return {
            "reward_mean": float(ok.mean()) if len(ok) else 0.0,
            "reward_std": float(ok.std(unbiased=False)) if len(ok) else 0.0,
            "valid_fraction": float(valid.float().mean()),
            "completion_length": tokens / len(rollouts),
            "tokens_per_second": tokens / (t3 - t0),
            "generate_seconds": t1 - t0,
            "score_seconds": t2 - t1,
            "update_seconds": t3 - t2,
            "step_seconds": t3 - t0,
            **update,
        }

    async def _generate(self, rows: list[dict[str, Any]], step: int) -> list[Rollout]:
        p = self.params
        seed = (p.sampling.seed if p.sampling.seed is not None else self.spec.training.seed) + step
        sampling = sampling_to_proto(p.sampling.__dict__ | {"seed": seed})
        adapter = self.policy_revision if self.policy.lora else ""
        request_id = f"{self.ctx.job.name}-s{step}"
        try:
            return await self._generate_once(rows, sampling, adapter, request_id)
        except PolicyLost:
            self.ctx.log("the rollout service lost the policy; loading it again", "warning")
            await self._serve()
            return await self._generate_once(rows, sampling, adapter, request_id)

    async def _generate_once(
        self, rows: list[dict[str, Any]], sampling: Any, adapter: str, request_id: str
    ) -> list[Rollout]:
        """Completions made by the current policy only: their log-probs are log pi_old. A full
        model is served without an adapter name, so a base that another job of the team
        reloaded would go unnoticed but for each completion's `policy_version`."""
        try:
            rollouts = await self.rollout.generate(rows, sampling, adapter, request_id)
        except grpc.aio.AioRpcError as exc:
            if self.policy_revision and adapter_missing(exc):
                raise PolicyLost(f"the rollout service lost {self.policy_revision}") from exc
            raise
        expected = self.policy_revision or self.spec.base_model
        stale = sorted({r.policy_version for r in rollouts} - {expected})
        if stale:
            raise PolicyLost(f"the rollout service generated with {stale}, not {expected}")
        return rollouts

    def update(self, batch: Batch, advantages: torch.Tensor) -> dict[str, float]:
        """mu = num_iterations optimizer steps on one generation batch; advantages (N, T)."""
        p, t = self.params, self.spec.training
        config = loss_config(p)
        ref = self.policy.reference_logprobs(batch) if p.beta > 0 else None  # (N, T)
        learning_rate = float(self.scheduler.get_last_lr()[0])  # what this step's updates use
        logp = self.policy.logprobs(batch)  # (N, T)
        old = logp.detach()  # before the first update the policy is pi_old (as TRL on policy)
        weights, sampler = sampler_correction(old, batch, p)
        losses, kls, clips, grad_norm = [], [], [], 0.0
        for iteration in range(p.num_iterations):
            if iteration > 0:
                logp = self.policy.logprobs(batch)
            inputs = algos.LossInputs(logp, old, advantages, batch.mask, ref, weights)
            out = algos.policy_loss(inputs, config)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradient
            params = [q for q in self.policy.model.parameters() if q.requires_grad]
            norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            self.scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
            self.scaler.update()
            self.scheduler.step()
            losses.append(float(out.loss.detach()))
            kls.append(out.kl)
            clips.append(out.clip_fraction)
            grad_norm = float(norm)
        return {
            "loss": sum(losses) / len(losses),
            "kl": sum(kls) / len(kls),
            "clip_fraction": sum(clips) / len(clips),
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            **sampler,
        }

    # Sync --------------------------------------------------------------------------------

    async def sync(self, step: int) -> str:
        """Save the policy, upload it as a revision of the output model, have the rollout
        service load it, and record the resume point."""
        ctx = self.ctx
        folder = ctx.folder / POLICY
        shutil.rmtree(folder, ignore_errors=True)
        self.policy.model.save_pretrained(folder)
        if not self.policy.lora:
            self.tokenizer.save_pretrained(folder)
        if ctx.stop.is_set():
            raise Cancelled()
        job_id = ctx.job.name.removeprefix("jobs/")
        revision = await ctx.upload(folder, self.policy.lora, request_id=f"{job_id}-step-{step}")
        if self.policy.lora:
            await self.rollout.load_adapter(revision)
        else:
            await self.rollout.serve_model(revision, force=True)
        self.policy_revision = revision
        self._save_state(step)
        ctx.events.emit("checkpoint", step=step, policy_revision=revision)
        return revision

    def _save_state(self, step: int) -> None:
        path = self.ctx.folder / CHECKPOINTS / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "policy_revision": self.policy_revision,
            "trainable": self.policy.trainable(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # never a torn resume point

    async def cleanup(self) -> None:
        await self.rollout.close()
        await self.reward.close()


def _device(plan: dict[str, Any]) -> str:
    return "cuda" if plan.get("device_type") == "cuda" else "cpu"


async def run(ctx: WorkerContext) -> dict[str, Any]:
    job = GrpoRun(ctx)
    try:
        await job.setup()
        metrics = await job.train()
    finally:
        await job.cleanup()
    return {"output_model_revision": job.policy_revision, "metrics": metrics}
