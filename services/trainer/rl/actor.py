"""The actor: the trainable policy of online RL (verl's `DataParallelPPOActor`).

It computes log-probs at the sampling temperature (as TRL, verl and OpenRLHF train), the
reference's log-probs (the base: a frozen copy for full tuning, the adapters disabled for LoRA),
and updates itself on a generation batch: `num_iterations` optimizer steps, each accumulating
the gradients of micro-batches of at most `micro_batch_size` sequences, so that no forward pass
holds all B x G sequences. It owns its optimizer, scheduler and loss scaler, saves and restores
that state, and exports its weights to a folder. On several devices each rank holds a replica
(or, sharded with FSDP2, 1/N of it) and trains its share of the micro-batches, the gradients
summed over the group; a sharded actor's every forward pass, export and checkpoint is a command
of the group's (`rl/group.py`).
A critic (PPO) is another class with the same methods. Shapes as in `rl/batch.py`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForCausalLM, get_scheduler

from services.trainer.distributed import (
    full_state_dict,
    full_trainable,
    load_model,
    load_sharded,
    save_sharded,
    shard_from_rank0,
    unique_names,
)
from services.trainer.methods import METHODS
from services.trainer.rl import KlEstimator, LossType, algos
from services.trainer.rl.batch import TokenBatch
from services.trainer.rl.group import ActorGroup, Command, Saved, by_micro_batch, lead, share
from services.trainer.spec import ALL_LINEAR, GrpoParams, JobSpec, LoraParams, PpoParams
from services.trainer.worker_io import check_lora_targets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class Objective:
    """How a generation batch updates the actor: the loss, mu = `num_iterations` optimizer
    steps, `micro_batch_size` sequences per forward pass (0: all), truncated IS on or off."""

    loss: algos.LossConfig
    num_iterations: int = 1
    micro_batch_size: int = 0
    is_correction: bool = False
    is_cap: float = 3.0


# How much a micro-batch's loss weighs in the generation batch's, so that accumulating them
# gives the loss of the whole batch in one pass: (micro mask, batch mask, micro-batches) -> w.
# grpo and dr_grpo normalise by the samples in the loss, dapo by the batch's tokens (set in the
# loss config); bnpo is a per-micro-batch token mean by definition, averaged as TRL does.
def _row_share(micro: torch.Tensor, whole: torch.Tensor, count: int) -> float:
    return float((micro.sum(dim=1) > 0).sum()) / max(float((whole.sum(dim=1) > 0).sum()), 1.0)


MicroWeight = Callable[[torch.Tensor, torch.Tensor, int], float]
MICRO_WEIGHTS: dict[LossType, MicroWeight] = {
    LossType.GRPO: _row_share,
    LossType.DR_GRPO: _row_share,
    LossType.DAPO: lambda micro, whole, count: 1.0,
    LossType.BNPO: lambda micro, whole, count: 1.0 / count,
}


def completion_logprobs(
    model: Any,
    batch: TokenBatch,
    temperature: float = 1.0,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(o_t | q, o_<t) of each completion token under softmax(logits / temperature), and
    (when asked, without gradient unless `entropy_grad`: PPO's entropy bonus) the entropy of
    that distribution at each position.

    Returns (N, T) and (N, T) or None, zero-padded past each completion."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits  # (N, L, V)
    rows, entropies = [], []
    for i, (p, c) in enumerate(zip(batch.prompt_lens, batch.completion_lens, strict=True)):
        step_logits = logits[i, p - 1 : p - 1 + c]  # (C_i, V): position t predicts t + 1
        targets = batch.input_ids[i, p : p + c]  # (C_i,)
        rows.append(algos.token_logprobs(step_logits, targets, temperature))  # (C_i,)
        if entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                logp = torch.log_softmax(step_logits.float() / temperature, dim=-1)  # (C_i, V)
                entropies.append(-(logp.exp() * logp).sum(dim=-1))  # (C_i,)
    logps = pad_sequence(rows, batch_first=True)  # (N, T)
    return logps, pad_sequence(entropies, batch_first=True) if entropy else None


def sampler_correction(
    old: torch.Tensor, batch: TokenBatch, objective: Objective
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The truncated IS weights (None when off), and how far the trainer's log pi_old is from
    the sampler's log-probs: ~0 right after a sync (same weights) when they are temperature-scaled
    (GRPO with the correction asks for them) or the temperature is 1."""
    mask, tokens = batch.mask, batch.mask.sum().clamp_min(1)
    gap = (old - batch.sampling_logp).abs() * mask  # (N, T)
    metrics = {"logprob_mismatch": float(gap.sum() / tokens)}
    if not objective.is_correction:
        return None, metrics
    weights = algos.truncated_is_weights(old, batch.sampling_logp, mask, objective.is_cap)
    metrics["importance_ratio_mean"] = float((weights * mask).sum() / tokens)
    metrics["importance_ratio_max"] = float((weights * mask).max()) if mask.numel() else 0.0
    return weights, metrics


@dataclass
class _Micro:
    """A micro-batch, its advantages and reference log-probs, its weight in the batch's loss;
    log pi_old and the IS weights once its first forward pass ran."""

    batch: TokenBatch
    advantages: torch.Tensor  # (n, t)
    ref: torch.Tensor | None  # (n, t)
    weight: float
    old: torch.Tensor | None = None  # (n, t)
    weights: torch.Tensor | None = None  # (n, t)
    filler: bool = False  # a sharded rank's padding pass: weight 0, no statistics


class Means:
    """Token-weighted means of per-token statistics over micro-batches and iterations (the
    actor's update; PPO's mini-batches and epochs)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, name: str, value: float, weight: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}


def optimizer_step(models: list[ShardedTraining], max_grad_norm: float) -> float:
    """The one optimizer step of every model trained here (the actor alone, or PPO's actor and
    critic together): unscale each one's gradients, clip their norm together (TRL's PPO clips
    its policy-and-value wrapper as one model), step each optimizer and schedule, then tell each
    model it `changed`. Returns the norm before clipping (over every rank's shards)."""
    parameters = []
    for m in models:
        m.scaler.unscale_(m.optimizer)  # clip the true gradient
        parameters += m.trainable_parameters()
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or float("inf"))
    if hasattr(norm, "full_tensor"):  # sharded gradients: the norm over every rank's shards
        norm = norm.full_tensor()
    for m in models:
        m.scaler.step(m.optimizer)  # skipped when fp16 gradients overflowed
        m.scaler.update()
        m.scheduler.step()
        m.changed()
    return float(norm)


class ShardedTraining:
    """A model being trained (Actor, Critic: `model`, `optimizer`, `scheduler`, `scaler`,
    `group`, `sharded`, `checkpoints`, `_kept`) and its resume state: `training_state` for a
    replica; sharded, the weights and optimizer state go to a DCP checkpoint
    `checkpoints/{SHARDS}-{optimizer steps}` that every rank writes (its `SAVE` command)."""

    SHARDS = ""  # the checkpoints' name prefix
    SAVE = Command.SAVE  # the command the other ranks write their shards on
    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    group: ActorGroup | None
    sharded: bool
    checkpoints: Path | None
    _kept: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def changed(self) -> None:
        """Its weights changed (`optimizer_step`); nothing cached from them by default."""

    def shard_scaler(self) -> None:
        """After `optimizer_parts`: sharded, each rank sees only its shards' overflow, so the
        ranks agree on it (ShardedGradScaler) and all skip the same fp16 steps."""
        if self.sharded and self.scaler.is_enabled():
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.device.type, enabled=True)

    def check_loadable(self, state: dict[str, Any]) -> None:
        """A replica's resume state (its weights whole) does not load into a sharded model:
        ValueError, before any collective."""
        if self.sharded and "shards" not in state:
            name = self.SHARDS
            raise ValueError(
                f"a replicated {name}'s resume state (no sharded checkpoint) does not load into "
                f"a sharded (FSDP) {name}: resume with the plan that saved it (DDP)"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resume state (`state_dict`'s), on every rank of a group: a sharded checkpoint
        loads on any number of ranks, sharded or not (DCP reshards); a replica's into replicas
        only (`check_loadable`)."""
        self.check_loadable(state)
        if "shards" not in state:
            load_training_state(self, state)
            return
        assert self.checkpoints is not None and self.scaler is not None
        load_sharded(self.checkpoints / state["shards"], self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self._kept = state["shards"]

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs (`training_state`); sharded, the weights and optimizer state go
        to a sharded checkpoint (`save_shards`) that the returned state names."""
        if not self.sharded:
            return training_state(self)
        assert self.scaler is not None
        name = f"{self.SHARDS}-{self.scheduler.last_epoch}"  # optimizer steps: one per save
        self.save_shards(name)
        return {
            "shards": name,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def save_shards(self, name: str) -> None:
        """Every rank's shards of the trainable weights and optimizer state (DCP) to
        `checkpoints/name`; rank 0 then drops the ones no resume state names any more."""
        assert self.checkpoints is not None, f"set the {self.SHARDS}'s checkpoints folder"
        with lead(self.group, self.SAVE, name):
            save_sharded(self.checkpoints / name, self.model, self.optimizer)
        if self.group is None or self.group.rank == 0:
            # The resume state naming `_kept` stays in force until the one naming `name` is.
            for old in self.checkpoints.glob(f"{self.SHARDS}-*"):
                if old.name not in (name, self._kept):
                    shutil.rmtree(old, ignore_errors=True)
        self._kept = name


class Actor(ShardedTraining):
    """The policy being trained. `autocast` is the 16-bit compute dtype (None: fp32) under which
    fp32 master weights train; `reference` is the frozen copy (full tuning with KL), else None."""

    SHARDS = "actor"

    def __init__(
        self,
        model: Any,
        reference: Any | None,
        lora: bool,
        autocast: torch.dtype | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.model, self.reference, self.lora = model, reference, lora
        self.autocast, self.temperature = autocast, temperature
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.max_grad_norm = 0.0
        # Several ranks (`rl/group.py`): this rank trains its share of each batch's
        # micro-batches and the gradients are summed over the group; None: one process.
        self.group: ActorGroup | None = None
        # FSDP2 over the group (`shard`): every forward pass is a collective. Its checkpoints
        # go to `checkpoints` (the job's folder), the last one written or read is `_kept`.
        self.sharded = False
        self.checkpoints: Path | None = None
        self._kept = ""
        self._gathered: dict[str, torch.Tensor] | None = None  # this version's, on rank 0

    def shard(self, device: str) -> None:
        """FSDP2 over the group, before `configure_optimizer`: the policy (gradients summed over
        the ranks, as the replicated path's all_reduce) and the frozen reference, rank 0's
        weights sent to the other ranks (built on "meta", see `build_actor`), their shards on
        `device`."""
        assert self.group is not None and self.optimizer is None
        shard_from_rank0(self.model, device, sum_gradients=True)
        if self.reference is not None:
            shard_from_rank0(self.reference, device)
        self.sharded = True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizer(self, spec: JobSpec, precision: str, total_updates: int) -> None:
        """AdamW with the job's schedule over `total_updates` optimizer steps; fp16 scales the
        loss, or small gradients underflow (bf16 has fp32's range)."""
        lr = spec.training.learning_rate or 0.0
        self.optimizer, self.scheduler, self.scaler = optimizer_parts(
            self.trainable_parameters(), spec, lr, precision, total_updates, self.device
        )
        self.shard_scaler()
        self.max_grad_norm = spec.training.max_grad_norm

    def _compute(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """log pi_theta at the sampling temperature, differentiable. (N, T)."""
        with self._compute():
            return completion_logprobs(self.model, batch, self.temperature)[0]

    def forward(
        self, batch: TokenBatch, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_theta, differentiable, and the entropy at the sampling temperature, with its
        gradient when `entropy_grad` (PPO's entropy bonus). (N, T) each."""
        with self._compute():
            logp, entropy = completion_logprobs(
                self.model, batch, self.temperature, True, entropy_grad
            )
        assert entropy is not None
        return logp, entropy

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """log pi_ref at the sampling temperature. (N, T)."""
        with self._compute():
            if self.lora:
                with self.model.disable_adapter():
                    return completion_logprobs(self.model, batch, self.temperature)[0]
            return completion_logprobs(self.reference, batch, self.temperature)[0]

    @torch.no_grad()
    def reference_kl(
        self, batch: TokenBatch, estimator: KlEstimator, micro_batch_size: int = 0
    ) -> torch.Tensor:
        """KL_t of the policy as it is (pi_old, before the batch's update) to the reference, per
        loss token, `micro_batch_size` sequences per forward pass (0: all): the KL penalty in
        the reward of RLOO and REINFORCE++. No gradient. (N, T)."""

        def kl_of(mb: TokenBatch) -> torch.Tensor:
            return algos.KL_ESTIMATORS[estimator](
                self.logprobs(mb).float(), self.reference_logprobs(mb).float(), mb.mask
            )  # (n, t)

        if not self.sharded:  # one process, or a replica on rank 0 alone
            return by_micro_batch([kl_of], batch, micro_batch_size)[0]  # (N, T)
        with lead(self.group, Command.KL, batch, estimator, micro_batch_size):
            return by_micro_batch([kl_of], batch, micro_batch_size, self.group, padded=True)[0]

    def update(
        self, batch: TokenBatch, advantages: torch.Tensor, objective: Objective
    ) -> dict[str, float]:
        """mu = `num_iterations` optimizer steps on one generation batch, each accumulating the
        gradients of its micro-batches; advantages (N, T). log pi_old is the actor's own before
        the first step (TRL on policy), taken from the first forward pass: no extra pass."""
        assert self.optimizer is not None and self.scaler is not None, "configure_optimizer first"
        with lead(self.group, Command.UPDATE, batch, advantages, objective):  # rank 0 sends it
            return self._update(batch, advantages, objective)

    def changed(self) -> None:
        """Whenever the weights change (each `optimizer_step`, a resume): a new version,
        gathered again when exported or pushed."""
        self._gathered = None

    def _update(
        self, batch: TokenBatch, advantages: torch.Tensor, objective: Objective
    ) -> dict[str, float]:
        assert self.optimizer is not None
        group = self.group
        # DAPO divides by the tokens of the whole generation batch, whichever micro-batch.
        config = replace(objective.loss, batch_tokens=float(batch.mask.sum()))
        n = len(batch)
        size = objective.micro_batch_size or n
        ranks = group.size if group is not None else 1
        count, micro = -(-n // size), []
        # This rank's micro-batches (the others' are another rank's: the weights below are
        # shares of the whole batch); a sharded rank short of them pads with the last one.
        for index in share(group, count, padded=self.sharded):
            a = (count - 1 if index is None else index) * size
            mb = batch.rows(a, min(a + size, n))
            adv = advantages[a : a + len(mb), : mb.mask.shape[1]]  # (n, t)
            ref = self.reference_logprobs(mb) if config.beta > 0 else None
            weight = MICRO_WEIGHTS[config.loss_type](mb.mask, batch.mask, count)
            filler = index is None
            micro.append(_Micro(mb, adv, ref, 0.0 if filler else weight, filler=filler))
        stats, grad_norm = Means(), 0.0
        learning_rate = float(self.scheduler.get_last_lr()[0])  # what this batch's steps use
        for _ in range(objective.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss = sum(
                self._accumulate(m, objective, config, Means() if m.filler else stats)
                for m in micro
            )
            if group is not None and not self.sharded:  # FSDP summed them in backward
                group.reduce_gradients(self.trainable_parameters())
            grad_norm = optimizer_step([self], self.max_grad_norm)
            # This rank's part of the batch's loss: the parts add up to it over the ranks.
            stats.add("loss", loss * ranks, 1.0 / ranks)
        if group is not None:
            stats.sums, stats.weights = group.merge_means(stats.sums, stats.weights)
        return {**stats.means(), "grad_norm": grad_norm, "learning_rate": learning_rate}

    def _accumulate(
        self, m: _Micro, objective: Objective, config: algos.LossConfig, stats: Means
    ) -> float:
        """Forward and backward of one micro-batch, its loss weighted by its share; log pi_old,
        IS weights and entropy come from its first pass. Returns the weighted loss."""
        first = m.old is None
        with self._compute():
            logp, entropy = completion_logprobs(self.model, m.batch, self.temperature, first)
        tokens = float(m.batch.mask.sum())
        if m.old is None:
            m.old = logp.detach()
            m.weights, sampler = sampler_correction(m.old, m.batch, objective)
            for name, value in sampler.items():
                stats.add(name, value, tokens)
        if entropy is not None:
            stats.add("entropy", float((entropy * m.batch.mask).sum()) / max(tokens, 1), tokens)
        inputs = algos.LossInputs(logp, m.old, m.advantages, m.batch.mask, m.ref, m.weights)
        out = algos.policy_loss(inputs, config)
        assert self.scaler is not None
        self.scaler.scale(out.loss * m.weight).backward()
        self._clip_stats(stats, logp.detach(), m.old, m.advantages, m.batch.mask, config)
        stats.add("kl", out.kl, tokens)
        return float(out.loss.detach()) * m.weight

    @staticmethod
    def _clip_stats(
        stats: Means,
        logp: torch.Tensor,
        old: torch.Tensor,
        adv: torch.Tensor,
        mask: torch.Tensor,
        config: algos.LossConfig,
    ) -> None:
        """TRL's clip ratios: low (rho < 1 - eps with A < 0), high (rho > 1 + eps with A > 0)."""
        ratio = torch.exp(algos.log_ratio(logp, old, mask))  # (n, t)
        low = (ratio < 1 - config.epsilon) & (adv < 0)
        high = (ratio > 1 + config.epsilon) & (adv > 0)
        tokens = float(mask.sum())
        for name, hit in (("low", low), ("high", high), ("region", low | high)):
            value = float((hit.float() * mask).sum()) / max(tokens, 1.0)
            stats.add(f"clip_ratio/{name}", value, tokens)

    # State -------------------------------------------------------------------------------

    def load_state_dict(  # type: ignore[override]
        self, state: dict[str, Any], saved: Saved | None = None
    ) -> None:
        """A resume state (see `ShardedTraining.load_state_dict`). In a group rank 0 sends
        `saved`, where it read `state` (file and entry), and every rank reads it there."""
        self.check_loadable(state)
        if self.group is not None and self.group.rank == 0 and saved is None:
            raise ValueError("a group resumes from a state file: pass where it was read")
        with lead(self.group, Command.LOAD, *(saved or ())):
            super().load_state_dict(state)
            self.changed()

    def gathered(self) -> dict[str, torch.Tensor]:
        """A sharded actor's weights, whole, on rank 0's CPU: the full state dict (tied
        aliases once) or LoRA's trainable adapters; gathered once per version (the export and
        the push of a sync share it)."""
        gathered = self._gathered  # an update thread's `changed` may clear it meanwhile
        if gathered is None:
            with lead(self.group, Command.GATHER):
                gathered = self._gathered = self.gather()
        return gathered

    def gather(self) -> dict[str, torch.Tensor]:
        """`gathered`'s collective, on every rank (empty but on rank 0)."""
        if self.lora:
            return full_trainable(self.model)
        names = unique_names(self.model)
        return {k: v for k, v in full_state_dict(self.model).items() if k in names}

    def export(self, folder: Path, tokenizer: Any | None = None) -> None:
        """The adapter (LoRA) or the full weights and tokenizer, as the registry stores them
        (sharded: from the weights gathered to rank 0, which exports)."""
        if self.sharded:
            self.model.save_pretrained(folder, state_dict=self.gathered())
        else:
            self.model.save_pretrained(folder)
        if not self.lora and tokenizer is not None:
            tokenizer.save_pretrained(folder)


def training_state(owner: Any) -> dict[str, Any]:
    """Trainable weights, optimizer, scheduler and loss scaler of a model being trained (Actor,
    Critic: `model`, `optimizer`, `scheduler`, `scaler`): what a resume needs."""
    assert owner.optimizer is not None and owner.scaler is not None
    trainable = {
        n: p.detach().clone() for n, p in owner.model.named_parameters() if p.requires_grad
    }
    return {
        "trainable": trainable,
        "optimizer": owner.optimizer.state_dict(),
        "scheduler": owner.scheduler.state_dict(),
        "scaler": owner.scaler.state_dict(),
    }


def load_training_state(owner: Any, state: dict[str, Any]) -> None:
    assert owner.optimizer is not None and owner.scaler is not None
    owner.model.load_state_dict(state["trainable"], strict=False)
    owner.optimizer.load_state_dict(state["optimizer"])
    owner.scheduler.load_state_dict(state["scheduler"])
    owner.scaler.load_state_dict(state["scaler"])


def optimizer_parts(
    params: list[torch.nn.Parameter],
    spec: JobSpec,
    learning_rate: float,
    precision: str,
    total_updates: int,
    device: torch.device,
) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """AdamW at `learning_rate`, the job's schedule over `total_updates` optimizer steps, and
    the loss scaler (on for fp16 only): the same for the actor and the critic."""
    t = spec.training
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=t.weight_decay)
    scheduler = get_scheduler(
        SCHEDULERS[t.lr_scheduler],
        optimizer,
        num_warmup_steps=math.ceil(t.warmup_ratio * total_updates),
        num_training_steps=total_updates,
    )
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def lora_config(lora: LoraParams, task_type: str) -> LoraConfig:
    """peft's config for the job's LoRA settings."""
    targets = ALL_LINEAR if ALL_LINEAR in lora.target_modules else list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.peft_alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
    )


def build_actor(path: Any, spec: JobSpec, precision: str, device: str) -> Actor:
    """LoRA loads the frozen base in `precision` (peft keeps the adapters fp32); full tuning
    loads fp32 weights and autocasts to a 16-bit precision, since 16-bit weights round small
    updates (lr 1e-6 x Adam's ~1 step) away. The frozen reference needs no master copy; with
    the method's KL coefficient 0 (GRPO's beta, PPO's kl_coef: the method table's
    `reference_unless_zero`) there is none. Dropout is off (eval mode), as TRL's
    `disable_dropout`. On `device` "meta" the structure only, no weight read (a sharded group's
    ranks but 0, which `Actor.shard` gives rank 0's weights)."""
    torch.manual_seed(spec.training.seed)  # LoRA's A matrices
    compute = DTYPES[precision]
    autocast = compute if compute != torch.float32 else None
    weights = compute if spec.lora is not None else torch.float32
    model = load_model(AutoModelForCausalLM, path, weights, device)
    check_lora_targets(spec, model)
    params: GrpoParams | PpoParams = spec.params
    temperature = params.sampling.temperature
    if spec.lora is None:
        reference = None
        if getattr(params, METHODS[spec.method].reference_unless_zero):
            reference = copy.deepcopy(model).to(compute).eval().requires_grad_(False)
        return Actor(model.eval(), reference, False, autocast, temperature)
    config = lora_config(spec.lora, "CAUSAL_LM")
    return Actor(get_peft_model(model, config).eval(), None, True, autocast, temperature)
