"""The critic of PPO: a value model V(s_t) (verl's `DataParallelPPOCritic`), on one device, a
replica on each rank of a group, or sharded with FSDP2 over it beside a sharded actor.

It is a sequence-classification model with one label, as TRL's PPO builds its value model: a
reward model's score head becomes the value head, or the policy's base gets a new one. Its
backbone's hidden state at each position, through that head, is the value of the state before
the next token (TRL's `get_reward` on every position). It trains full or LoRA as the job's
tuning says (the head is always trained), with dropout off, fp32 master weights under the
compute precision's autocast, its own AdamW, schedule and loss scaler. Shapes as in `rl/batch.py`.

Sharded (`shard`), it is sharded as `completion_values` calls it: each decoder layer and the
backbone, and the score head apart (the backbone and the head are called one after the other,
so each is an FSDP root of its own); its checkpoints are DCP shards (`critic-N`) beside the
actor's, written on every rank (`Command.CRITIC_SAVE`) and read on any number of ranks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForSequenceClassification

from services.trainer.distributed import load_model, shard_from_rank0
from services.trainer.rl.actor import (
    DTYPES,
    ShardedTraining,
    lora_config,
    optimizer_parts,
)
from services.trainer.rl.batch import TokenBatch
from services.trainer.rl.group import ActorGroup, Command
from services.trainer.spec import JobSpec
from services.trainer.worker_io import check_lora_targets


def parts(model: Any) -> tuple[Any, Any]:
    """The backbone (the decoder) and the score head of a sequence-classification model (or
    peft's wrapper of one)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.score


def completion_values(model: Any, batch: TokenBatch) -> torch.Tensor:
    """V(q, o_<t) for each completion token t: the head on the hidden state at the position
    before it (the one that predicts it). (N, T) fp32, zero-padded past each completion."""
    backbone, score = parts(model)
    hidden = backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (N, L, H)
    scores = score(hidden).squeeze(-1).float()  # (N, L)
    rows = [
        scores[i, p - 1 : p - 1 + c]  # (C_i,)
        for i, (p, c) in enumerate(zip(batch.prompt_lens, batch.completion_lens, strict=True))
    ]
    return pad_sequence(rows, batch_first=True)  # (N, T)


class Critic(ShardedTraining):
    """The value model being trained; `autocast` is the 16-bit compute dtype (None: fp32)."""

    SHARDS, SAVE = "critic", Command.CRITIC_SAVE

    def __init__(self, model: Any, autocast: torch.dtype | None = None) -> None:
        self.model, self.autocast = model, autocast
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        # As the actor's (`rl/actor.py`): its group, and FSDP2 over it; its sharded
        # checkpoints go to `checkpoints`, the last one written or read is `_kept`.
        self.group: ActorGroup | None = None
        self.sharded = False
        self.checkpoints: Path | None = None
        self._kept = ""

    def shard(self, device: str) -> None:
        """FSDP2 over the group, before `configure_optimizer`, the gradients summed over the
        ranks (each micro-batch's loss is weighted by its share of the global mini-batch);
        rank 0's weights sent to the other ranks (built on "meta", see `build_critic`), their
        shards on `device`. The backbone (each decoder layer, then the rest) and the head are
        sharded apart."""
        assert self.group is not None and self.optimizer is None
        shard_from_rank0(self.model, device, parts(self.model), sum_gradients=True)
        self.sharded = True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizer(
        self, spec: JobSpec, learning_rate: float, precision: str, total_updates: int
    ) -> None:
        """AdamW at `learning_rate` with the job's schedule over `total_updates` steps."""
        self.optimizer, self.scheduler, self.scaler = optimizer_parts(
            self.trainable_parameters(), spec, learning_rate, precision, total_updates, self.device
        )
        self.shard_scaler()

    def values(self, batch: TokenBatch) -> torch.Tensor:
        """V per completion token, differentiable. (N, T) fp32."""
        context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.autocast is not None:
            context = torch.autocast(self.device.type, dtype=self.autocast)
        with context:
            return completion_values(self.model, batch)


def build_critic(path: Any, spec: JobSpec, precision: str, device: str) -> Critic:
    """From a reward model (its score head kept) or a causal LM (a new head, N(0, 0.02) as the
    config's initializer_range), with the job's tuning: full weights in fp32 under autocast,
    or LoRA on a frozen base in the compute precision with the head trained in full. On
    `device` "meta" the structure only, no weight read (a sharded group's ranks but 0, which
    `Critic.shard` gives rank 0's weights)."""
    torch.manual_seed(spec.training.seed + 1)  # the new head and LoRA's A matrices
    compute = DTYPES[precision]
    autocast = compute if compute != torch.float32 else None
    weights = compute if spec.lora is not None else torch.float32
    model = load_model(AutoModelForSequenceClassification, path, weights, device, num_labels=1)
    if spec.lora is None:
        return Critic(model.eval(), autocast)
    check_lora_targets(spec, model)
    config = lora_config(spec.lora, "SEQ_CLS")  # keeps the score head trainable (modules_to_save)
    peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():  # the head trains in fp32 whatever the base's dtype
        if p.requires_grad:
            p.data = p.data.float()
    return Critic(peft_model.eval(), autocast)
