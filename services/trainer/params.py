"""Hyperparameters: frozen dataclasses whose defaults are the proto's documented ones.

`convert.py` builds them from the request, passing only the fields that were set. Every numeric
field has a range in its class's BOUNDS table (a test holds the tables to the proto's numeric
fields), so no value that would exhaust a worker or overflow a library gets through. Which
method reads which field is the method table's business (`methods.py`), not theirs.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from services.common.errors import FieldViolation
from services.specs.sampling import SamplingSpec
from services.trainer.rl import REWARD_KL_ESTIMATORS, AdvantageEstimator, LossType, ScaleRewards


class DpoLoss(enum.StrEnum):
    """TRL 1.16's DPO losses that we offer (DPOConfig.loss_type)."""

    SIGMOID = "sigmoid"  # Rafailov et al., 2023, eq. 7
    HINGE = "hinge"  # SLiC (Zhao et al., 2023)
    IPO = "ipo"  # Azar et al., 2023, eq. 17
    ROBUST = "robust"  # Chowdhury et al., 2024 (rDPO): label_smoothing = flip probability


# The DPO losses TRL 1.16 computes with label_smoothing; "sigmoid" no longer reads it (cDPO).
LABEL_SMOOTHING_LOSSES = frozenset({DpoLoss.ROBUST})
LR_SCHEDULERS = ("linear", "cosine", "constant")
DPO_LOSSES = tuple(DpoLoss)
GRPO_LOSSES = tuple(LossType)  # the enums the RL math dispatches on (services/trainer/rl)
SCALE_REWARDS = tuple(ScaleRewards)
ADVANTAGE_ESTIMATORS = tuple(AdvantageEstimator)
PRECISIONS = ("fp32", "bf16", "fp16")
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head
# A torch module path: attribute names, and indices into ModuleLists ("model.layers.0.mlp").
MODULE_NAME = re.compile(r"(?:[A-Za-z_]\w*|\d+)(?:\.(?:[A-Za-z_]\w*|\d+))*", re.ASCII)
MAX_MODULE_NAME = 200
MAX_TARGET_MODULES = 64
MAX_STEPS = 10_000_000  # any step count or interval
MAX_LENGTH = 131_072  # tokens: the longest context of current open models
MAX_GENERATIONS = 256  # completions per prompt
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit (transformers' set_seed seeds numpy too)


@dataclass(frozen=True)
class Bound:
    """The range a numeric field must lie in, closed unless an end is marked open; `note` says
    what a special value means."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False
    note: str = ""

    def holds(self, value: float) -> bool:
        # Comparisons with NaN are false and the ends are finite: NaN and inf never hold.
        above = value > self.lo if self.open_lo else value >= self.lo
        below = value < self.hi if self.open_hi else value <= self.hi
        return above and below

    def describe(self) -> str:
        left, right = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
        text = f"must be in {left}{self.lo}, {self.hi}{right}"
        return f"{text} ({self.note})" if self.note else text


def _out_of_bounds(params: Any, at: str) -> list[FieldViolation]:
    """A violation for each field of `params` outside its range in the class's BOUNDS."""
    bounds: dict[str, Bound] = type(params).BOUNDS
    return [
        FieldViolation(f"{at}.{name}", bound.describe())
        for name, bound in bounds.items()
        if getattr(params, name) is not None and not bound.holds(getattr(params, name))
    ]


def _steps(lo: int, note: str = "") -> Bound:
    return Bound(lo, MAX_STEPS, note=note)


@dataclass(frozen=True)
class LoraParams:
    """LoRA (Hu et al., 2021). `target_modules` empty means all linear layers."""

    r: int = 16
    alpha: float = 32.0  # LoraConfig.alpha_value, or its deprecated int32 alpha
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (ALL_LINEAR,)

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "r": Bound(1, 1024),
        "alpha": Bound(1, 4096, note="alpha_value, or the deprecated int32 alpha"),
        "dropout": Bound(0, 1, open_hi=True),
    }

    def violations(self, at: str) -> list[FieldViolation]:
        return _out_of_bounds(self, at) + self._module_violations(f"{at}.target_modules")

    @property
    def peft_alpha(self) -> int:
        """alpha for peft's LoraConfig, which annotates it int: whole values stay ints (the
        adapter_config.json of an int alpha is unchanged), others pass as floats, which peft
        only divides by r.

        >>> (LoraParams(alpha=32.0).peft_alpha, LoraParams(alpha=12.5).peft_alpha)
        (32, 12.5)
        """
        alpha = float(self.alpha)
        return int(alpha) if alpha.is_integer() else alpha  # type: ignore[return-value]

    def _module_violations(self, at: str) -> list[FieldViolation]:
        """Names peft matches against module paths, or the one wildcard it knows."""
        modules = self.target_modules
        if len(modules) > MAX_TARGET_MODULES:
            return [FieldViolation(at, f"at most {MAX_TARGET_MODULES} names")]
        if ALL_LINEAR in modules and len(modules) > 1:
            return [FieldViolation(at, f"{ALL_LINEAR!r} already names every linear layer")]
        return [
            FieldViolation(
                f"{at}[{i}]",
                f"{name[:80]!r} is not a module name such as q_proj or model.layers.0.mlp, "
                f"nor {ALL_LINEAR!r}",
            )
            for i, name in enumerate(modules)
            if name != ALL_LINEAR
            and not (len(name) <= MAX_MODULE_NAME and MODULE_NAME.fullmatch(name))
        ]


@dataclass(frozen=True)
class TrainingParams:
    """Shared optimisation settings. learning_rate None means the method's default."""

    learning_rate: float | None = None
    epochs: float = 1.0
    max_steps: int = 0
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every: int = 500
    log_every: int = 10
    eval_every: int = 0

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "learning_rate": Bound(0, 1, open_lo=True, open_hi=True),
        "epochs": Bound(0, 1000, open_lo=True),
        "max_steps": _steps(0, "0: derived from epochs"),
        "per_device_batch_size": Bound(1, 1024),
        "gradient_accumulation_steps": Bound(1, 1024),
        "max_length": Bound(8, MAX_LENGTH, note="tokens"),
        "warmup_ratio": Bound(0, 1, open_hi=True),
        "weight_decay": Bound(0, 1),
        "max_grad_norm": Bound(0, 1000, note="0 disables clipping"),
        "seed": Bound(0, MAX_SEED),
        "save_every": _steps(0, "0 disables checkpoints"),
        "log_every": _steps(1),
        "eval_every": _steps(0, "0: only at the end"),
    }

    def violations(self, at: str) -> list[FieldViolation]:
        return _out_of_bounds(self, at) + _checks(
            at,
            (
                self.lr_scheduler in LR_SCHEDULERS,
                "lr_scheduler",
                f"must be one of {', '.join(LR_SCHEDULERS)}",
            ),
        )


@dataclass(frozen=True)
class SftParams:
    completion_only_loss: bool = True
    packing: bool = False

    BOUNDS: ClassVar[dict[str, Bound]] = {}  # no numeric fields

    def violations(self, at: str) -> list[FieldViolation]:
        return []


@dataclass(frozen=True)
class DpoParams:
    """DPO (Rafailov et al., 2023). label_smoothing is the chance that a preference label is
    flipped, which only loss_type "robust" reads in TRL 1.16 (rDPO, Chowdhury et al., 2024)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    max_prompt_length: int = 512

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "beta": Bound(0, 10, open_lo=True),
        "label_smoothing": Bound(0, 0.5, open_hi=True),
        "max_prompt_length": Bound(1, MAX_LENGTH, note="tokens"),
    }

    def violations(self, at: str) -> list[FieldViolation]:
        return _out_of_bounds(self, at) + _checks(
            at,
            (self.loss_type in DPO_LOSSES, "loss_type", f"must be one of {', '.join(DPO_LOSSES)}"),
        )


@dataclass(frozen=True)
class KtoParams:
    """KTO (Ethayarajh et al., 2024)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "beta": Bound(0, 10, open_lo=True),
        "desirable_weight": Bound(0, 100, open_lo=True),
        "undesirable_weight": Bound(0, 100, open_lo=True),
    }

    def violations(self, at: str) -> list[FieldViolation]:
        return _out_of_bounds(self, at)


@dataclass(frozen=True)
class RewardModelParams:
    """Bradley-Terry reward model; centring from Eisenstein et al., 2023."""

    center_rewards_coefficient: float = 0.0

    BOUNDS: ClassVar[dict[str, Bound]] = {"center_rewards_coefficient": Bound(0, 10)}

    def violations(self, at: str) -> list[FieldViolation]:
        return _out_of_bounds(self, at)


@dataclass(frozen=True)
class Sampling(SamplingSpec):
    """Rollout sampling, refused at job creation by the rules the rollout service applies
    (`services/specs/sampling.py`), under the job's own caps for n and max_tokens (the serving
    replica checks its smaller limits later)."""

    # Only the fields the rollout's rules leave unbounded; n, temperature, top_p and
    # max_tokens are theirs.
    BOUNDS: ClassVar[dict[str, Bound]] = {
        "top_k": Bound(0, 1_000_000, note="0 disables; vocabularies are smaller"),
        "seed": Bound(0, 2**63 - 1),
    }

    def violations(self, at: str) -> list[FieldViolation]:
        found = self.problems(MAX_GENERATIONS, MAX_LENGTH, at)
        named = {v.field for v in found}
        return found + [v for v in _out_of_bounds(self, at) if v.field not in named]


@dataclass(frozen=True)
class EvaluateParams:
    sampling: Sampling = field(default_factory=Sampling)
    max_samples: int = 0

    BOUNDS: ClassVar[dict[str, Bound]] = {"max_samples": _steps(0, "0: all")}

    def violations(self, at: str) -> list[FieldViolation]:
        return _out_of_bounds(self, at) + self.sampling.violations(f"{at}.sampling")


@dataclass(frozen=True)
class GrpoParams:
    """GRPO (Shao et al., 2024), or the same loop with RLOO's or REINFORCE++'s advantages
    (`advantage_estimator`). `sampling.n` is always num_generations (set by `complete`)."""

    num_generations: int = 8
    sampling: Sampling = field(default_factory=Sampling)
    beta: float = 0.04
    epsilon: float = 0.2
    num_iterations: int = 1
    scale_rewards: str = "group"
    sync_every: int = 1
    loss_type: str = "grpo"
    use_bias_correction_kl: bool = True
    importance_sampling_correction: bool = True
    importance_sampling_cap: float = 3.0
    advantage_estimator: str = "grpo"
    kl_estimator: str = "k1"  # of the KL in the reward (rloo, reinforce_pp)
    max_policy_lag: int = 0  # 1: generate batch k+1 while training on batch k
    publish_every: int = 0  # registry revisions; 0: at checkpoints and the end only

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "num_generations": Bound(
            2, MAX_GENERATIONS, note="group advantages compare samples of one prompt"
        ),
        "beta": Bound(0, 10, note="0: no KL"),
        "epsilon": Bound(0, 1, open_lo=True, open_hi=True),
        "num_iterations": Bound(1, 64),
        "sync_every": _steps(1),
        "importance_sampling_cap": Bound(
            1, 100, note="below 1 it would shrink on-policy tokens too"
        ),
        "max_policy_lag": Bound(0, 1, note="0: synchronous; 1: one-step off-policy"),
        "publish_every": _steps(0, "0: at checkpoints and the end"),
    }

    def violations(self, at: str) -> list[FieldViolation]:
        own = _out_of_bounds(self, at) + _checks(
            at,
            (
                self.loss_type in GRPO_LOSSES,
                "loss_type",
                f"must be one of {', '.join(GRPO_LOSSES)}",
            ),
            (
                self.sampling.temperature > 0,
                "sampling.temperature",
                "must be > 0: greedy samples of one prompt are all the same",
            ),
            (
                self.scale_rewards in SCALE_REWARDS,
                "scale_rewards",
                f"must be one of {', '.join(SCALE_REWARDS)}",
            ),
            (
                self.advantage_estimator in ADVANTAGE_ESTIMATORS,
                "advantage_estimator",
                f"must be one of {', '.join(ADVANTAGE_ESTIMATORS)}",
            ),
            (
                self.kl_estimator in REWARD_KL_ESTIMATORS,
                "kl_estimator",
                f"must be one of {', '.join(REWARD_KL_ESTIMATORS)} (GRPO's KL in the loss is k3)",
            ),
        )
        # n is num_generations, whose range is checked above: name it once, there.
        n = min(max(self.num_generations, 1), MAX_GENERATIONS)
        return own + dataclasses.replace(self.sampling, n=n).violations(f"{at}.sampling")


# A model revision (or alias) by its full name; `convert` completes "models/m" to latest.
MODEL_REVISION = re.compile(r"models/[^/]+/revisions/[^/]+")


@dataclass(frozen=True)
class PpoParams:
    """PPO (Schulman et al., 2017) with a critic and GAE, in its RLHF form (Ouyang et al., 2022;
    Huang et al., 2024). `sampling.n` completions per prompt; critic_model "" is the policy's
    base with a new value head; critic_learning_rate None is training.learning_rate (filled
    in by `complete`); target_kl 0 keeps kl_coef fixed."""

    sampling: Sampling = field(default_factory=Sampling)
    kl_coef: float = 0.05
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 4
    sync_every: int = 1
    critic_model: str = ""
    critic_learning_rate: float | None = None
    num_mini_batches: int = 1
    target_kl: float = 0.0
    kl_horizon: int = 10_000
    whiten_rewards: bool = False
    reward_clip: float = 0.0
    whiten_advantages: bool = True
    entropy_coef: float = 0.0
    publish_every: int = 0  # registry revisions; 0: at checkpoints and the end only

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "kl_coef": Bound(0, 10, note="0: no KL penalty, no reference model"),
        "cliprange": Bound(0, 1, open_lo=True, open_hi=True),
        "cliprange_value": Bound(0, 1000, open_lo=True),
        "vf_coef": Bound(0, 100, open_lo=True),
        "gamma": Bound(0, 1),
        "lam": Bound(0, 1),
        "ppo_epochs": Bound(1, 64),
        "sync_every": _steps(1),
        "critic_learning_rate": Bound(0, 1, open_lo=True, open_hi=True),
        "num_mini_batches": Bound(1, 1024, note="at most the samples per step"),
        "target_kl": Bound(0, 100, note="0: kl_coef stays fixed"),
        "kl_horizon": _steps(1, "samples"),
        "reward_clip": Bound(0, 1e6, note="0: no clipping"),
        "entropy_coef": Bound(0, 10),
        "publish_every": _steps(0, "0: at checkpoints and the end"),
    }

    def violations(self, at: str) -> list[FieldViolation]:
        return (
            _out_of_bounds(self, at)
            + _checks(
                at,
                (
                    not self.critic_model or bool(MODEL_REVISION.fullmatch(self.critic_model)),
                    "critic_model",
                    "must look like models/{id}/revisions/{revision or alias}",
                ),
                (
                    self.sampling.temperature > 0,
                    "sampling.temperature",
                    "must be > 0: PPO's log-probs are at the sampling temperature",
                ),
            )
            + self.sampling.violations(f"{at}.sampling")
        )


MethodParams = (
    SftParams | DpoParams | KtoParams | RewardModelParams | EvaluateParams | GrpoParams | PpoParams
)


@dataclass(frozen=True)
class DevicePlan:
    """device_type: "auto", "cpu" or "cuda"; strategy: "auto", "single", "ddp", "fsdp"."""

    device_type: str = "auto"
    devices_per_node: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = ""  # "" = bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    max_devices: int = 0  # auto plans only: most devices to use (0: all)
    cpu_offload: bool = False  # FSDP on GPUs: sharded state in host memory

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "devices_per_node": Bound(1, 64),
        "num_nodes": Bound(1, 1024),
        "max_devices": Bound(0, 65_536, note="0: all"),
    }

    def violations(self, at: str) -> list[FieldViolation]:
        return _out_of_bounds(self, at) + _checks(
            at,
            (
                self.precision in ("", *PRECISIONS),
                "precision",
                f"must be one of {', '.join(PRECISIONS)}",
            ),
        )


def _checks(at: str, *checks: tuple[bool, str, str]) -> list[FieldViolation]:
    return [FieldViolation(f"{at}.{name}", message) for ok, name, message in checks if not ok]
