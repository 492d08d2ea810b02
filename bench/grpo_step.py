"""GRPO step time through the services vs TRL's GRPOTrainer, on the same model and shape.

8 prompts x G=4 completions x up to 48 new tokens, beta 0.04, one update per batch, on the
~3.5M-parameter tiny model ("bench"), full tuning and LoRA (r 8 on q/v). Our side is a real
GRPO job (`tlm up`'s four services in this process, the job in its worker process; rollout,
reward, update and policy sync every step); its step time is the gap between consecutive
metrics events, stamped by the worker. TRL's is `GRPOTrainer.train()` timed by a callback
around each optimizer step (its generation, reward, update). Both: steady-state median after
warm-up steps. Prints both and the ratio (target <= 1.0). Mode `ppo` runs a PPO job on the same
shape (critic included) and prints its step time beside GRPO's (TRL 1.16 has no PPO trainer).
Mode `async` compares our own loops on the same job (full tuning): synchronous (max_policy_lag
0) and asynchronous rollout (max_policy_lag 1: batch k+1 generated and scored while batch k
trains), `--rounds` jobs of each, interleaved (sync, async, sync, ...) so that drift in the
machine's load hits both alike; the median steady step of each and the ratio async / sync.

    .venv/bin/python bench/grpo_step.py [--steps 12] [--warmup 3] [--rounds 2]
        [--modes full,lora,ppo,async]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from services.clients.registry import RegistryClient
from services.clients.trainer import TrainerClient
from services.common.logs import configure_logging
from services.common.settings import ServerSettings
from services.devtools.server_thread import ServerThread
from services.devtools.tiny_models import cached_tiny_model
from tlm.registry.v1 import registry_pb2
from tlm.rollout.v1 import rollout_pb2
from tlm.trainer.v1 import trainer_pb2 as pb

PROMPTS, G, NEW_TOKENS, BETA, LR = 8, 4, 48, 0.04, 1e-5
LORA_R, LORA_ALPHA, LORA_MODULES = 8, 16, ["q_proj", "v_proj"]
PATTERN = "[aeiou]"  # reward: vowel count, the same cheap rule on both sides
ROWS = [{"prompt": f"Write a word with many vowels, number {i}:"} for i in range(64)]


# Ours: a GRPO job through the services ------------------------------------------------------


def ppo_spec(base: str, dataset: str, evaluator: str, steps: int) -> pb.TrainingJobSpec:
    """PPO on the same shape, full tuning: the critic (a copy of the base with a value head) and
    ppo_epochs 1 with one mini-batch, so each step is one update of policy and critic."""
    spec = grpo_spec(base, dataset, evaluator, False, steps)
    spec.ClearField("grpo")
    spec.method = pb.METHOD_PPO
    spec.output_model = "models/bench-ppo"
    spec.ppo.CopyFrom(
        pb.PpoParams(
            kl_coef=BETA, ppo_epochs=1, num_mini_batches=1, sync_every=1,
            sampling=rollout_pb2.SamplingParams(
                n=G, max_tokens=NEW_TOKENS, temperature=1.0, seed=1
            ),
        )
    )  # fmt: skip
    return spec


def lag_spec(base: str, dataset: str, evaluator: str, lag: int, steps: int) -> pb.TrainingJobSpec:
    """GRPO, full tuning, with rollout `lag` publications behind (0: synchronous)."""
    spec = grpo_spec(base, dataset, evaluator, False, steps)
    spec.output_model = f"models/bench-grpo-lag{lag}"
    spec.grpo.max_policy_lag = lag
    return spec


def grpo_spec(
    base: str, dataset: str, evaluator: str, lora: bool, steps: int
) -> pb.TrainingJobSpec:
    tuning = (
        pb.Tuning(lora=pb.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_MODULES))
        if lora
        else pb.Tuning(full=pb.FullTuning())
    )
    return pb.TrainingJobSpec(
        method=pb.METHOD_GRPO,
        base_model=base,
        train_dataset=dataset,
        evaluator=evaluator,
        tuning=tuning,
        output_model=f"models/bench-grpo-{'lora' if lora else 'full'}",
        training=pb.TrainingParams(
            max_steps=steps, per_device_batch_size=PROMPTS, log_every=1,
            save_every=0, learning_rate=LR,
        ),
        grpo=pb.GrpoParams(
            num_generations=G, beta=BETA, sync_every=1,
            sampling=rollout_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=1),
        ),
    )  # fmt: skip


async def upload_inputs(address: str, model: Path, folder: Path) -> tuple[str, str, str]:
    registry = RegistryClient(address)
    try:
        await registry.create_model("bench")
        base = await registry.upload_model_revision("models/bench", model)
        rows = folder / "prompts.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        data = await registry.upload_dataset_file(
            "datasets/bench", rows, registry_pb2.DATASET_KIND_PROMPT
        )
        evaluator = {"scorers": [{"name": "vowels", "regex": {"pattern": PATTERN, "count": True}}]}
        spec = await registry.create_evaluator_revision("evaluators/bench", json.dumps(evaluator))
        return base.name, data.name, spec.name
    finally:
        await registry.close()


async def our_step_times(address: str, spec: pb.TrainingJobSpec) -> list[float]:
    async with TrainerClient(address) as trainer:
        job = await trainer.create_job(pb.CreateTrainingJobRequest(spec=spec))
        stamps: list[float] = []
        async for event in trainer.watch(job.name, timeout_s=3600):
            if event.HasField("metrics"):
                stamps.append(event.time.ToNanoseconds() / 1e9)
        done = await trainer.get_job(job.name)
        if done.state != pb.TrainingJob.STATE_SUCCEEDED:
            raise SystemExit(f"GRPO job {job.name} ended {done.state}: {done.error.message}")
    return [b - a for a, b in itertools.pairwise(stamps)]


# TRL: GRPOTrainer on the same model and shape ---------------------------------------------


class StepTimer(TrainerCallback):  # type: ignore[misc]
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.times.append(time.perf_counter() - self._start)


def vowels(completions: list[str], **_: object) -> list[float]:
    import re2

    pattern = re2.compile(PATTERN)
    return [float(len(pattern.findall(c))) for c in completions]


def trl_step_times(model_dir: Path, lora: bool, steps: int, out: Path) -> list[float]:
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        max_steps=steps, logging_steps=1, learning_rate=LR, beta=BETA,
        per_device_train_batch_size=PROMPTS * G, num_generations=G,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, seed=1,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft = (
        LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_MODULES, task_type="CAUSAL_LM"
        )
        if lora
        else None
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model, reward_funcs=vowels, args=config, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_list(ROWS), peft_config=peft, callbacks=[timer],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # its log lines would bury the result
    trainer.train()
    return timer.times


def steady(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:] or times)


def sync_vs_async(address: str, inputs: tuple[str, str, str], args: argparse.Namespace) -> None:
    """Interleaved jobs of max_policy_lag 0 and 1; the median of their steady steps."""
    runs: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(args.rounds):
        for lag in (0, 1):
            ours = asyncio.run(our_step_times(address, lag_spec(*inputs, lag, args.steps + 1)))
            runs[lag] += ours[args.warmup :] or ours
    sync, async_ = statistics.median(runs[0]), statistics.median(runs[1])
    print(f"[async] TLM GRPO step, max_policy_lag 0 (synchronous): {sync:.3f} s  n={len(runs[0])}")
    print(
        f"[async] TLM GRPO step, max_policy_lag 1 (asynchronous): {async_:.3f} s  n={len(runs[1])}"
    )
    print(f"[async] ratio async / sync: {async_ / sync:.2f} (below 1.0: the overlap pays)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)  # jobs of each loop in mode async
    parser.add_argument("--modes", default="full,lora,ppo,async")
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    model = cached_tiny_model("bench")
    from services.embedded import SERVICE_ORDER, bindings_for

    with tempfile.TemporaryDirectory() as tmp:
        shared = ServerSettings(host="127.0.0.1", port=0, data_dir=Path(tmp), insecure_dev=True)
        with ServerThread(lambda: bindings_for(SERVICE_ORDER, shared), shared) as server:
            base, data, evaluator = asyncio.run(upload_inputs(server.address, model, Path(tmp)))
            print(f"workload: {PROMPTS} prompts x G={G} x {NEW_TOKENS} tokens, beta {BETA}, "
                  f"tiny 'bench' model, CPU, torch threads {torch.get_num_threads()}")  # fmt: skip
            grpo_full = None
            for mode in args.modes.split(","):
                if mode == "async":
                    sync_vs_async(server.address, (base, data, evaluator), args)
                    continue
                if mode == "ppo":  # TRL 1.16 has no PPO trainer: beside our GRPO step instead
                    spec = ppo_spec(base, data, evaluator, args.steps + 1)
                    ours = asyncio.run(our_step_times(server.address, spec))
                    o = steady(ours, args.warmup)
                    print(f"[ppo] TLM PPO job step: {o:.3f} s  runs={[round(x, 2) for x in ours]}")
                    if grpo_full is not None:
                        print(f"[ppo] ratio PPO / GRPO (full): {o / grpo_full:.2f}")
                    continue
                lora = mode == "lora"
                spec = grpo_spec(base, data, evaluator, lora, args.steps + 1)
                ours = asyncio.run(our_step_times(server.address, spec))
                theirs = trl_step_times(model, lora, args.steps, Path(tmp) / f"trl-{mode}")
                o, t = steady(ours, args.warmup), steady(theirs, args.warmup)
                grpo_full = o if not lora else grpo_full
                print(f"[{mode}] TLM GRPO job step: {o:.3f} s  runs={[round(x, 2) for x in ours]}")
                runs = [round(x, 2) for x in theirs]
                print(f"[{mode}] TRL GRPOTrainer step: {t:.3f} s  runs={runs}")
                print(f"[{mode}] ratio TLM / TRL: {o / t:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
