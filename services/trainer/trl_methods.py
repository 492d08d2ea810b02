"""Offline methods on TRL: SFT, DPO, KTO and reward-model training, one recipe per method.

A run is setup (download, shape rows, build config and trainer) / train / save / upload. TRL
and torch are imported here only, so the service process never loads them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from trl import (
    DPOConfig,
    DPOTrainer,
    KTOConfig,
    KTOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)

from services.trainer.distributed import is_main, stop_agreed
from services.trainer.domain import Method
from services.trainer.rl.actor import lora_config
from services.trainer.spec import JobSpec
from services.trainer.worker_io import WorkerContext, check_lora_targets
from services.trainer.worker_protocol import CHECKPOINTS, OUTPUT

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# TRL's end-of-run summary; reported in the result, not as a step.
SUMMARY_KEYS = ("train_runtime", "train_loss", "train_samples_per_second")


class EventsCallback(TrainerCallback):
    """Reports progress to the service and stops training when the worker is cancelled."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.summary: dict[str, float] = {}
        self._tokens: tuple[float, float] | None = None  # (num_tokens, time) at the last log

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ctx.events.emit("started", total_steps=state.max_steps)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if stop_agreed(self.ctx.stop.is_set()):  # in a group: every rank stops at this step
            self.ctx.stop.set()
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ctx.events.emit("checkpoint", step=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        logs = dict(logs or {})
        if any(key in logs for key in SUMMARY_KEYS):
            self.summary = {k: v for k, v in logs.items() if isinstance(v, int | float)}
            return
        values = {k: v for k, v in logs.items() if k not in ("epoch", "step")}
        now = time.monotonic()
        if "num_tokens" in logs:
            tokens = float(logs["num_tokens"])
            if self._tokens is not None and now > self._tokens[1]:
                rate = (tokens - self._tokens[0]) / (now - self._tokens[1])
                values["tokens_per_second"] = rate
            self._tokens = (tokens, now)
        self.ctx.events.emit(
            "metrics", step=state.global_step, epoch=state.epoch or 0.0, values=values
        )


# Row shaping: registry rows -> the columns TRL reads ------------------------------------------


def _as_messages(value: Any, role: str) -> Any:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _split_chat(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat as a conversational prompt/completion pair, so TRL's completion_only_loss masks
    the prompt: the completion is the last assistant turn, the prompt every turn before it.
    Earlier assistant turns are context only (not trained); turns after the last are dropped."""
    last = max(
        (i for i, m in enumerate(messages) if m.get("role") == "assistant"),
        default=len(messages) - 1,
    )
    return {"prompt": messages[:last], "completion": [messages[last]]}


def sft_row(row: dict[str, Any]) -> dict[str, Any]:
    if "messages" in row:
        return _split_chat(row["messages"])
    return {"prompt": row["prompt"], "completion": row["completion"]}


def preference_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}


def unpaired_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": row["prompt"], "completion": row["completion"], "label": bool(row["label"])}


def uniform(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """TRL reads a dataset as text or as chat from its first row, so one chat row makes every
    row chat: text prompts become a user turn, text answers an assistant turn."""
    if not any(isinstance(v, list) for r in rows for v in r.values()):
        return rows
    return [
        {k: _as_messages(v, "user" if k == "prompt" else "assistant") for k, v in r.items()}
        for r in rows
    ]


# Recipes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    config_cls: type
    trainer_cls: type
    shape: Callable[[dict[str, Any]], dict[str, Any]]
    params: Callable[[Any], dict[str, Any]]  # method params -> TRL config kwargs
    sequence_classification: bool = False


RECIPES: dict[Method, Recipe] = {
    Method.SFT: Recipe(
        SFTConfig,
        SFTTrainer,
        sft_row,
        lambda p: {"completion_only_loss": p.completion_only_loss, "packing": p.packing},
    ),
    Method.DPO: Recipe(
        DPOConfig,
        DPOTrainer,
        preference_row,
        lambda p: {
            "beta": p.beta,
            "loss_type": [p.loss_type],
            "label_smoothing": p.label_smoothing,
        },
    ),
    Method.KTO: Recipe(
        KTOConfig,
        KTOTrainer,
        unpaired_row,
        lambda p: {
            "beta": p.beta,
            "desirable_weight": p.desirable_weight,
            "undesirable_weight": p.undesirable_weight,
        },
    ),
    Method.REWARD_MODEL: Recipe(
        RewardConfig,
        RewardTrainer,
        preference_row,
        lambda p: {"center_rewards_coefficient": p.center_rewards_coefficient or None},
        sequence_classification=True,
    ),
}


def trl_config(spec: JobSpec, plan: dict[str, Any], folder: Path, recipe: Recipe, evals: bool):
    t = spec.training
    strategy = ("steps" if t.eval_every else "no") if evals else "no"
    return recipe.config_cls(
        output_dir=str(folder / CHECKPOINTS),
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=SCHEDULERS[t.lr_scheduler],
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        logging_steps=t.log_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=2,
        eval_strategy=strategy,
        eval_steps=t.eval_every or None,
        max_length=t.max_length,
        use_cpu=plan["device_type"] == "cpu",
        bf16=plan["precision"] == "bf16",
        fp16=plan["precision"] == "fp16",
        activation_checkpointing=bool(plan.get("gradient_checkpointing", False))
        and plan.get("strategy", "single") != "fsdp",
        **parallel_args(plan),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **recipe.params(spec.params),
    )


def parallel_args(plan: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments for the plan's strategy. A torchrun group is data parallel (DDP) by
    default through accelerate; FSDP is accelerate's FSDP2 plugin (`fully_shard`), with its
    own activation checkpointing and CPU offload, and sharded checkpoints written with
    torch.distributed.checkpoint (resumable on another number of ranks).

    >>> parallel_args({"strategy": "ddp"})
    {'ddp_find_unused_parameters': False}
    >>> fsdp = parallel_args({"strategy": "fsdp", "gradient_checkpointing": True})
    >>> fsdp["fsdp_config"]  # doctest: +NORMALIZE_WHITESPACE
    {'version': 2, 'state_dict_type': 'SHARDED_STATE_DICT', 'cpu_offload': False,
     'activation_checkpointing': True}
    """
    if plan.get("strategy", "single") == "ddp":
        return {"ddp_find_unused_parameters": False}
    if plan.get("strategy", "single") != "fsdp":
        return {}
    config = {
        "version": 2,
        "state_dict_type": "SHARDED_STATE_DICT",
        "cpu_offload": plan.get("cpu_offload", False),
        "activation_checkpointing": plan.get("gradient_checkpointing", False),
    }
    return {"fsdp": True, "fsdp_config": config}


def peft_config(spec: JobSpec, recipe: Recipe) -> LoraConfig | None:
    if spec.lora is None:
        return None
    return lora_config(spec.lora, "SEQ_CLS" if recipe.sequence_classification else "CAUSAL_LM")


def load_model(path: Path, recipe: Recipe, spec: JobSpec, precision: str, pad_id: int | None):
    """LoRA loads the frozen base in the plan's precision; full tuning loads fp32 weights and
    trains them under bf16/fp16 autocast, since 16-bit weights round small updates away (and
    fp16's GradScaler refuses fp16 parameters)."""
    dtype = DTYPES[precision] if spec.lora is not None else torch.float32
    if recipe.sequence_classification:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        model.config.pad_token_id = pad_id
        return model
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def resume_checkpoint(checkpoints: Path, step: int) -> str | None:
    """The checkpoint of the last save the service recorded (it is told after the save
    completed); later folders may be half-written by a crash and are deleted first."""
    for folder in checkpoints.glob("checkpoint-*"):
        number = folder.name.removeprefix("checkpoint-")
        if not number.isdigit() or int(number) > step:
            shutil.rmtree(folder, ignore_errors=True)
    chosen = checkpoints / f"checkpoint-{step}"
    return str(chosen) if step > 0 and chosen.is_dir() else None


def truncate_prompts(rows: list[dict[str, Any]], tokenizer: Any, limit: int) -> None:
    """DPO's max_prompt_length: keep a text prompt's last `limit` tokens (chat prompts as is)."""
    for row in rows:
        if isinstance(row["prompt"], str):
            ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            if len(ids) > limit:
                row["prompt"] = tokenizer.decode(ids[-limit:])


async def run(ctx: WorkerContext) -> dict[str, Any]:
    spec, recipe = ctx.spec, RECIPES[ctx.spec.method]
    base = await ctx.base_model()
    rows = [recipe.shape(r) for r in await ctx.rows(spec.train_dataset)]
    eval_rows = (
        [recipe.shape(r) for r in await ctx.rows(spec.eval_dataset)] if spec.eval_dataset else []
    )
    rows, eval_rows = uniform(rows), uniform(eval_rows)
    ctx.log(f"read {len(rows)} training rows, {len(eval_rows)} eval rows")
    ctx.check_stop()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if spec.method is Method.DPO:
        truncate_prompts(rows + eval_rows, tokenizer, spec.params.max_prompt_length)
    callback = EventsCallback(ctx)
    trainer = _trainer(ctx, base, tokenizer, rows, eval_rows, callback)
    resume = resume_checkpoint(ctx.folder / CHECKPOINTS, ctx.job.resume_step)
    if ctx.job.resume_step and resume is None:
        ctx.log(f"checkpoint-{ctx.job.resume_step} is missing: starting over", level="warning")
    trainer.train(resume_from_checkpoint=resume)
    ctx.check_stop()
    metrics = dict(callback.summary)
    if eval_rows:
        metrics |= trainer.evaluate()
    return {
        "output_model_revision": await _save(ctx, trainer, tokenizer, recipe),
        "metrics": metrics,
    }


def _trainer(
    ctx: WorkerContext,
    base: Path,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    callback: EventsCallback,
) -> Any:
    spec, recipe, plan = ctx.spec, RECIPES[ctx.spec.method], ctx.job.device_plan
    model = load_model(base, recipe, spec, plan["precision"], tokenizer.pad_token_id)
    check_lora_targets(spec, model)
    return recipe.trainer_cls(
        model=model,
        args=trl_config(spec, plan, ctx.folder, recipe, bool(eval_rows)),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config(spec, recipe),
        callbacks=[callback],
    )


async def _save(ctx: WorkerContext, trainer: Any, tokenizer: Any, recipe: Recipe) -> str:
    """LoRA causal LMs become adapter revisions; reward models are merged to full weights,
    since their score head is new and the base is a causal LM."""
    out = ctx.folder / OUTPUT
    model = trainer.model
    adapter = ctx.spec.lora is not None and not recipe.sequence_classification
    # The full state dict, gathered from the shards under FSDP (a collective: every rank).
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not is_main():
        return ""  # rank 0 saves and uploads
    if ctx.spec.lora is not None and recipe.sequence_classification:
        model, state = model.merge_and_unload(), None  # one device or DDP: full weights here
    if not adapter:
        tokenizer.save_pretrained(out)
    model.save_pretrained(out, state_dict=state)
    ctx.check_stop()  # the last cut-off: once the upload starts, the job ends with its result
    ctx.log("uploading the result to the registry")
    return await ctx.upload(out, adapter)
