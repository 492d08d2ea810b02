"""The method table: everything the trainer knows about a method, in one `MethodDef` each.

Validation (`spec.py`), the resource estimate (`resources.py`), creation checks (`core.py`),
conversion (`convert.py`), the worker's runner lookup (`worker.py`) and the CLI read it; a
method's behaviour changes here and nowhere else. Torch-free, so the service imports it.

`reads` lists the spec fields a method uses, as proto paths under `spec.` (`training.seed`,
`grpo.sampling.top_k`, `tuning.full`, `resources.explicit`); a field outside it, set to anything
but its default, is refused naming the field. `conditions` are fields that a method reads only
in some settings (`training.eval_every` needs an `eval_dataset`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.trainer.domain import DatasetKind, Method
from services.trainer.params import (
    LABEL_SMOOTHING_LOSSES,
    DevicePlan,
    DpoParams,
    EvaluateParams,
    GrpoParams,
    KtoParams,
    LoraParams,
    PpoParams,
    RewardModelParams,
    SftParams,
    TrainingParams,
)
from services.trainer.rl import KL_IN_REWARD


class Reference(enum.Enum):
    """The frozen reference policy a method's loss compares with, when tuning full weights
    (with LoRA the reference is always the base with its adapters disabled: no copy)."""

    NONE = "none"
    WEIGHTS = "weights"  # a copy like the policy's weights (TRL loads it at the policy's dtype)
    COMPUTE = "compute"  # a copy cast to the compute precision (our online loop)


class Batch(enum.Enum):
    """What one forward pass holds, for the activation estimate."""

    NONE = "none"  # nothing trains here (EVALUATE generates on the rollout service)
    ROWS = "rows"  # per_device_batch_size rows x sequences_per_row, of max_length tokens
    ROLLOUTS = "rollouts"  # per_device_batch_size prompts x G completions, prompt + max_tokens


@dataclass(frozen=True)
class ReadWhen:
    """`path` is read only when `holds(spec)`; otherwise it must keep its default (`why`)."""

    path: str
    holds: Callable[[Any], bool]  # on the JobSpec
    why: str


@dataclass(frozen=True)
class MethodDef:
    method: Method
    params_field: str  # its field in TrainingJobSpec's method_params oneof
    params: type  # the params dataclass (params.py)
    dataset: DatasetKind
    dataset_needs: str  # what to say when a dataset of another kind is given
    runner: str = ""  # module whose `run(ctx)` the worker calls; "" = not implemented yet
    trains: bool = True  # False: no weights, no optimizer, no output model
    evaluator: str = ""  # why it needs an evaluator, in the error's words; "" = takes none
    reference: Reference = Reference.NONE
    reference_unless_zero: str = ""  # a params field whose 0 drops the reference (GRPO's beta)
    master_precision: str = "fp32"  # full tuning keeps fp32 weights and autocasts
    learning_rate: tuple[float, float] = (2e-5, 2e-4)  # default (full, LoRA)
    batch: Batch = Batch.ROWS
    sequences_per_row: int = 1  # chosen + rejected = 2
    min_batch_size: tuple[int, str] = (1, "")  # and why
    dropout: bool = True  # LoRA dropout is on while it trains
    critic: bool = False  # a value model trains beside the policy (PPO): counted in estimates
    reads: frozenset[str] = frozenset()
    conditions: tuple[ReadWhen, ...] = ()

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def implemented(self) -> bool:
        return bool(self.runner)

    def default_learning_rate(self, lora: bool) -> float:
        full, with_lora = self.learning_rate
        return with_lora if lora else full


def paths(prefix: str, cls: type) -> frozenset[str]:
    """Every field path of the dataclass `cls` under `prefix`, nested dataclasses included."""
    found: set[str] = set()
    for f in dataclasses.fields(cls):
        kind = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            found |= paths(f"{prefix}.{f.name}", kind)
        else:
            found.add(f"{prefix}.{f.name}")
    return frozenset(found)


def _kl_in_reward(spec: Any) -> bool:
    """Whether the spec's advantage estimator puts `beta`'s KL in the reward (not the loss)."""
    return spec.params.advantage_estimator in KL_IN_REWARD


TUNING = frozenset({"tuning.full"}) | paths("tuning.lora", LoraParams)
TRAINING = paths("training", TrainingParams)
RESOURCES = frozenset({"resources.explicit", "resources.auto.max_devices"}) | (
    paths("resources.explicit", DevicePlan) - {"resources.explicit.max_devices"}
)
TRAINS = TUNING | TRAINING | RESOURCES | {"train_dataset", "eval_dataset", "output_model"}
TRAINS_WHEN = (
    ReadWhen("training.eval_every", lambda s: bool(s.eval_dataset), "needs spec.eval_dataset"),
    ReadWhen(
        "training.epochs",
        lambda s: s.training.max_steps == 0,
        "is not used when spec.training.max_steps is set; set one of them",
    ),
)
PROMPTS = "a prompt dataset (prompt, optional reference)"
PAIRS = "a preference dataset (prompt, chosen, rejected)"

METHODS: dict[Method, MethodDef] = {
    Method.SFT: MethodDef(
        Method.SFT,
        "sft",
        SftParams,
        DatasetKind.SFT,
        "an sft dataset (prompt, completion) or (messages)",
        runner="services.trainer.trl_methods",
        reads=TRAINS | paths("sft", SftParams),
        conditions=TRAINS_WHEN,
    ),
    Method.DPO: MethodDef(
        Method.DPO,
        "dpo",
        DpoParams,
        DatasetKind.PREFERENCE,
        PAIRS,
        runner="services.trainer.trl_methods",
        reference=Reference.WEIGHTS,
        sequences_per_row=2,
        reads=TRAINS | paths("dpo", DpoParams),
        conditions=(
            *TRAINS_WHEN,
            ReadWhen(
                "dpo.label_smoothing",
                lambda s: s.params.loss_type in LABEL_SMOOTHING_LOSSES,
                "is read by loss_type "
                + ", ".join(sorted(LABEL_SMOOTHING_LOSSES))
                + " only (TRL 1.16's other DPO losses ignore it)",
            ),
        ),
    ),
    Method.KTO: MethodDef(
        Method.KTO,
        "kto",
        KtoParams,
        DatasetKind.UNPAIRED_PREFERENCE,
        "an unpaired_preference dataset (prompt, completion, label)",
        runner="services.trainer.trl_methods",
        reference=Reference.WEIGHTS,
        sequences_per_row=2,  # each completion and a mismatched one for the KL baseline
        # KTO's KL baseline pairs each prompt with another row's completion in the batch.
        min_batch_size=(2, "KTO's KL baseline pairs rows within a batch"),
        reads=TRAINS | paths("kto", KtoParams),
        conditions=TRAINS_WHEN,
    ),
    Method.REWARD_MODEL: MethodDef(
        Method.REWARD_MODEL,
        "reward_model",
        RewardModelParams,
        DatasetKind.PREFERENCE,
        PAIRS,
        runner="services.trainer.trl_methods",
        sequences_per_row=2,
        reads=TRAINS | paths("reward_model", RewardModelParams),
        conditions=TRAINS_WHEN,
    ),
    Method.GRPO: MethodDef(
        Method.GRPO,
        "grpo",
        GrpoParams,
        DatasetKind.PROMPT,
        PROMPTS,
        runner="services.trainer.grpo",
        evaluator="to reward its rollouts (G completions per prompt of a prompt dataset)",
        reference=Reference.COMPUTE,
        reference_unless_zero="beta",
        learning_rate=(1e-6, 1e-5),
        batch=Batch.ROLLOUTS,
        dropout=False,
        # Completions are bounded by sampling.max_tokens, not max_length; the loop has no
        # gradient checkpointing yet; and its importance correction needs the log-probs.
        reads=(TRAINS - {"training.max_length", "resources.explicit.gradient_checkpointing"})
        | {"evaluator"}
        | (paths("grpo", GrpoParams) - {"grpo.sampling.skip_logprobs"}),
        conditions=(
            *TRAINS_WHEN,
            ReadWhen(
                "grpo.sampling.n",
                lambda s: s.params.sampling.n == s.params.num_generations,
                "is spec.grpo.num_generations for GRPO; set that instead",
            ),
            ReadWhen(
                "grpo.importance_sampling_cap",
                lambda s: s.params.importance_sampling_correction,
                "needs spec.grpo.importance_sampling_correction",
            ),
            ReadWhen(
                "grpo.max_policy_lag",
                lambda s: s.params.importance_sampling_correction,
                "needs spec.grpo.importance_sampling_correction: it corrects for samples of "
                "an older policy",
            ),
            ReadWhen(
                "grpo.use_bias_correction_kl",
                lambda s: s.params.beta > 0 and not _kl_in_reward(s),
                "has no effect with beta 0 (no KL term) or with advantage_estimator "
                "rloo or reinforce_pp (their KL is in the reward, not the loss)",
            ),
            ReadWhen(
                "grpo.scale_rewards",
                lambda s: s.params.advantage_estimator == "grpo",
                "is read by advantage_estimator grpo only (rloo subtracts the others' mean, "
                "reinforce_pp whitens over the batch)",
            ),
            ReadWhen(
                "grpo.kl_estimator",
                lambda s: s.params.beta > 0 and _kl_in_reward(s),
                "is the KL penalty's in the reward of advantage_estimator rloo and reinforce_pp "
                "with beta > 0; grpo's KL is k3, in the loss",
            ),
            ReadWhen(
                "tuning.lora.dropout",
                lambda s: s.lora is None or s.lora.dropout == 0,
                "must be 0: GRPO trains with dropout off, so its log-probs are the sampler's",
            ),
        ),
    ),
    Method.PPO: MethodDef(
        Method.PPO,
        "ppo",
        PpoParams,
        DatasetKind.PROMPT,
        PROMPTS,
        runner="services.trainer.ppo",
        evaluator="to reward its rollouts (sampling.n completions per prompt of a prompt dataset)",
        reference=Reference.COMPUTE,
        reference_unless_zero="kl_coef",
        learning_rate=(1e-6, 1e-5),
        batch=Batch.ROLLOUTS,
        dropout=False,
        critic=True,
        # As GRPO: completions are bounded by sampling.max_tokens, no gradient checkpointing,
        # and the sampler's log-probs are compared with the trainer's (logprob_mismatch).
        reads=(TRAINS - {"training.max_length", "resources.explicit.gradient_checkpointing"})
        | {"evaluator"}
        | (paths("ppo", PpoParams) - {"ppo.sampling.skip_logprobs"}),
        conditions=(
            *TRAINS_WHEN,
            ReadWhen(
                "ppo.kl_horizon",
                lambda s: s.params.target_kl > 0,
                "is the adaptive KL controller's: needs spec.ppo.target_kl",
            ),
            ReadWhen(
                "ppo.num_mini_batches",
                lambda s: (
                    s.params.num_mini_batches
                    <= s.training.per_device_batch_size
                    * s.training.gradient_accumulation_steps
                    * s.params.sampling.n
                ),
                "must be at most the samples per step (per_device_batch_size x "
                "gradient_accumulation_steps x sampling.n)",
            ),
            ReadWhen(
                "tuning.lora.dropout",
                lambda s: s.lora is None or s.lora.dropout == 0,
                "must be 0: PPO trains with dropout off, so its log-probs are the sampler's",
            ),
        ),
    ),
    Method.EVALUATE: MethodDef(
        Method.EVALUATE,
        "evaluate",
        EvaluateParams,
        DatasetKind.PROMPT,
        PROMPTS,
        runner="services.trainer.evaluate",
        trains=False,
        evaluator="to score the generations",
        batch=Batch.NONE,
        reads=frozenset({"train_dataset", "eval_dataset", "evaluator"})
        | paths("evaluate", EvaluateParams),
        conditions=(
            ReadWhen(
                "train_dataset",
                lambda s: not s.eval_dataset,
                "EVALUATE reads spec.eval_dataset when it is set; give one dataset",
            ),
        ),
    ),
}
# The table by its params field ("sft", "grpo", ...), for conversion.
BY_PARAMS_FIELD = {d.params_field: d for d in METHODS.values()}
# Every path a method may read: the fields that the unused-field check looks at.
ALL_PATHS = (
    TRAINS
    | {"evaluator"}
    | frozenset().union(*(paths(d.params_field, d.params) for d in METHODS.values()))
)
