"""The critic of PPO: a value model V(s_t) on one device (verl's `DataParallelPPOCritic`).

It is a sequence-classification model with one label, as TRL's PPO builds its value model: a
reward model's score head becomes the value head, or the policy's base gets a new one. Its
backbone's hidden state at each position, through that head, is the value of the state before
the next token (TRL's `get_reward` on every position). It trains full or LoRA as the job's
tuning says (the head is always trained), with dropout off, fp32 master weights under the
compute precision's autocast, its own AdamW, schedule and loss scaler. Shapes as in `rl/batch.py`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from peft import get_peft_model
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForSequenceClassification

from services.trainer.rl.actor import (
    DTYPES,
    load_training_state,
    lora_config,
    optimizer_parts,
    training_state,
)
from services.trainer.rl.batch import TokenBatch
from services.trainer.spec import JobSpec
from services.trainer.worker_io import check_lora_targets


def completion_values(model: Any, batch: TokenBatch) -> torch.Tensor:
    """V(q, o_<t) for each completion token t: the head on the hidden state at the position
    before it (the one that predicts it). (N, T) fp32, zero-padded past each completion."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (N, L, H)
    scores = inner.score(hidden).squeeze(-1).float()  # (N, L)
    rows = [
        scores[i, p - 1 : p - 1 + c]  # (C_i,)
        for i, (p, c) in enumerate(zip(batch.prompt_lens, batch.completion_lens, strict=True))
    ]
    return pad_sequence(rows, batch_first=True)  # (N, T)


class Critic:
    """The value model being trained; `autocast` is the 16-bit compute dtype (None: fp32)."""

    def __init__(self, model: Any, autocast: torch.dtype | None = None) -> None:
        self.model, self.autocast = model, autocast
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizer(
        self, spec: JobSpec, learning_rate: float, precision: str, total_updates: int
    ) -> None:
        """AdamW at `learning_rate` with the job's schedule over `total_updates` steps."""
        self.optimizer, self.scheduler, self.scaler = optimizer_parts(
            self.trainable_parameters(), spec, learning_rate, precision, total_updates, self.device
        )

    def values(self, batch: TokenBatch) -> torch.Tensor:
        """V per completion token, differentiable. (N, T) fp32."""
        context: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.autocast is not None:
            context = torch.autocast(self.device.type, dtype=self.autocast)
        with context:
            return completion_values(self.model, batch)

    def state_dict(self) -> dict[str, Any]:
        return training_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_training_state(self, state)


def build_critic(path: Any, spec: JobSpec, precision: str, device: str) -> Critic:
    """From a reward model (its score head kept) or a causal LM (a new head, N(0, 0.02) as the
    config's initializer_range), with the job's tuning: full weights in fp32 under autocast,
    or LoRA on a frozen base in the compute precision with the head trained in full."""
    torch.manual_seed(spec.training.seed + 1)  # the new head and LoRA's A matrices
    compute = DTYPES[precision]
    autocast = compute if compute != torch.float32 else None
    weights = compute if spec.lora is not None else torch.float32
    model: Any = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=weights
    )
    model = model.to(torch.device(device))
    if spec.lora is None:
        return Critic(model.eval(), autocast)
    check_lora_targets(spec, model)
    config = lora_config(spec.lora, "SEQ_CLS")  # keeps the score head trainable (modules_to_save)
    peft_model = get_peft_model(model, config)
    for p in peft_model.parameters():  # the head trains in fp32 whatever the base's dtype
        if p.requires_grad:
            p.data = p.data.float()
    return Critic(peft_model.eval(), autocast)
