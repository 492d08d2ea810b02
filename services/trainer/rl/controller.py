"""The single controller of online RL (verl's `RayPPOTrainer.fit`, on one process): the only
code that orders one step,

    prompts -> generate -> score -> advantages -> actor update -> (publish) -> metrics,

and decides when to publish the policy (`sync_every`, evaluations, the last step), evaluate
(`eval_every`), save the resume state (`save_every`) and log. It reaches the services only
through the ports (`rl/ports.py`) and the model only through the actor (`rl/actor.py`); PPO
hands the update to a `Learner` (`rl/ppo_learner.py`: the critic and GAE), still in this loop.

`max_policy_lag` is how many publications old a sample's policy may be. 0 (synchronous): each
step generates with the policy it trains. 1 (asynchronous, one-step off-policy as verl's
`one_step_off_policy` recipe and NeMo-RL's async GRPO): batch k+1 is generated and scored by
the served policy while the actor trains on batch k (the update runs in a thread, the RPCs on
the loop), and the new policy is published once that generation is done, so batch k+1 is always
exactly one publication old when it trains. The actor's truncated importance sampling (Yao et
al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; TRL 1.16's
`vllm_importance_sampling_correction` with `token_truncate`; verl's `rollout_is`) corrects for
it: each token's loss is weighted by min(pi_old / pi_behaviour, cap), with pi_behaviour the
log-probs the rollout returned. Samples from an older policy are dropped (masked, like unscored
ones) and counted; a batch with none from a known, fresh enough policy means the sampler lost
the policy: it is dropped, the policy is served again and the batch generated again once, then
the job fails. A resumed run generates its first batch with the policy it resumed (lag 0).
Shapes as in `rl/batch.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch

from services.trainer.rl import AdvantageEstimator, KlEstimator, ScaleRewards, algos
from services.trainer.rl.actor import Actor, Objective
from services.trainer.rl.batch import (
    Row,
    Sample,
    Score,
    ScoreStatus,
    TokenBatch,
    Trajectories,
    make_batch,
)
from services.trainer.rl.evaluation import evaluate
from services.trainer.rl.group import Saved
from services.trainer.rl.ports import (
    PolicyLost,
    PolicyPublisher,
    PolicyRef,
    PromptSource,
    Sampler,
    Scorer,
)
from services.trainer.spec import Sampling
from services.trainer.worker_protocol import CHECKPOINT_MARKER, CHECKPOINTS, POLICY

log = structlog.get_logger()
# Under checkpoints/: the resume state of a step, then the marker naming it (the commit point
# that the worker resumes from and the supervisor reads).
STATE_FILE = "grpo-state-{step}.pt"
LEGACY_STATE_FILE = "grpo-state.pt"  # before the marker: the only state, replaced in place
SAMPLES_SHOWN = 4  # sample completions per `samples` report
TEXT_SHOWN = 200  # characters of a prompt or completion shown


@dataclass(frozen=True)
class ControllerConfig:
    """What the loop needs: B = `prompts_per_step` rows per step, G = `group_size` samples each
    (`sampling.n`); `sampling.seed` is the base seed (step s samples with seed + s)."""

    total_steps: int
    prompts_per_step: int
    group_size: int
    sampling: Sampling
    objective: Objective
    advantage: AdvantageEstimator = AdvantageEstimator.GRPO
    scale_rewards: ScaleRewards = ScaleRewards.GROUP
    kl_in_reward: float = 0.0  # beta of a KL penalty in the reward (RLOO, REINFORCE++); 0: none
    kl_estimator: KlEstimator = KlEstimator.K1  # of that penalty
    sync_every: int = 1
    save_every: int = 0  # 0: no resume state
    log_every: int = 1
    eval_every: int = 0  # 0: at the end only (with eval rows)
    samples_every: int = 0  # 0: log_every x 10
    max_policy_lag: int = 0
    tag: str = "job"  # request ids and sample ids: {tag}-s{step}

    @property
    def trains_while_served(self) -> bool:
        """The actor trains on while its last publication is served (one step ahead, or several
        steps per publication): a lost push must be served again from a kept copy."""
        return self.max_policy_lag > 0 or self.sync_every > 1


class Reporter(Protocol):
    """Where the loop's events go (the worker's events file; a list in tests)."""

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def checkpoint(self, step: int, policy: PolicyRef) -> None: ...

    def samples(self, step: int, shown: list[dict[str, Any]]) -> None: ...

    def log(self, message: str, level: str = "info") -> None:
        """A job event for people: a dropped stale batch, a service outage waited through."""
        ...

    def check_stop(self) -> None:
        """Raise to stop the run (cancellation)."""
        ...


@dataclass(frozen=True)
class Generated:
    """A step's rows and samples, and when their generation ran (wall-clock seconds: metrics
    `timeline/*`, comparable across steps)."""

    rows: list[Row]
    samples: list[Sample]
    started: float
    ended: float


@dataclass(frozen=True)
class Rollout:
    """A generated batch with its scores: what one step trains on."""

    step: int
    generated: Generated
    scores: list[Score]
    scored: float  # when scoring ended


class Learner(Protocol):
    """What trains on a batch in place of the actor's own update, with models of its own: PPO's
    critic and GAE (`rl/ppo_learner.py`). Its state goes in the resume state."""

    def learn(self, actor: Actor, batch: TokenBatch, t: Trajectories) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], saved: Saved | None = None) -> None: ...


def compute_advantages(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    group_size: int,
    mask: torch.Tensor,
    estimator: AdvantageEstimator,
    options: algos.AdvantageOptions,
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """The estimator's per-token advantages on the loss tokens. rewards, valid: (N,); mask, kl
    (the KL_t of a KL penalty in the reward) and the result: (N, T), on the mask's device."""
    device = mask.device
    inputs = algos.AdvantageInputs(rewards.to(device), valid.to(device), group_size, mask, kl=kl)
    return algos.ADVANTAGE_ESTIMATORS[estimator](inputs, options)


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        actor: Actor,
        prompts: PromptSource,
        sampler: Sampler,
        scorer: Scorer,
        publisher: PolicyPublisher,
        reporter: Reporter,
        folder: Path,  # the job's: checkpoints/ and policy/ (the export before a publish)
        pad_id: int = 0,
        tokenizer: Any | None = None,
        eval_rows: list[Row] | None = None,
        learner: Learner | None = None,  # PPO: trains actor and critic in place of actor.update
    ) -> None:
        self.config, self.actor = config, actor
        self.prompts, self.sampler, self.scorer = prompts, sampler, scorer
        self.publisher, self.reporter = publisher, reporter
        self.folder, self.pad_id, self.tokenizer = folder, pad_id, tokenizer
        self.eval_rows = eval_rows or []
        self.learner = learner
        self.start_step = 0
        self.history: list[PolicyRef] = []  # published policies, the served one last

    @property
    def policy(self) -> PolicyRef:
        return self.history[-1]

    # Setup -------------------------------------------------------------------------------

    async def start(self) -> int:
        """Resume from the saved state if there is one; make the sampler serve the policy.
        Returns the first step to run."""
        served: PolicyRef | None = None
        path = saved_state(self.folder / CHECKPOINTS)
        if path is not None:
            state = torch.load(path, weights_only=False)
            # A group's other ranks read theirs from the file (`rl/group.py`).
            self.actor.load_state_dict(state["actor"], (path, "actor"))
            if self.learner is not None:
                self.learner.load_state_dict(state["learner"], (path, "learner"))
            self.start_step, served = state["step"], PolicyRef(**state["policy"])
            log.info("rl_resumed", step=self.start_step, policy=served.version)
        self.history = [await self.publisher.serve(served)]
        return self.start_step

    # Train -------------------------------------------------------------------------------

    async def run(self) -> dict[str, float]:
        """Steps start_step .. total_steps - 1; returns the last step's metrics (and the last
        evaluation's) with `train_runtime`. With max_policy_lag 1 the next step's batch is
        generated and scored while this one trains."""
        c, started = self.config, time.monotonic()
        window: list[dict[str, float]] = []
        last: dict[str, float] = {}
        ahead: tuple[asyncio.Task[Generated], asyncio.Task[Rollout]] | None = None
        try:
            for step in range(self.start_step, c.total_steps):
                self.reporter.check_stop()
                rollout = await self.fresh(await (ahead[1] if ahead else self.rollout(step)))
                ahead = None
                if c.max_policy_lag > 0 and step + 1 < c.total_steps:
                    ahead = self._ahead(step + 1)
                values, trajectories = await self.train(rollout)
                done = step + 1
                end = done == c.total_steps
                evaluating = bool(self.eval_rows) and (_every(done, c.eval_every) or end)
                if _every(done, c.sync_every) or end or evaluating:
                    if ahead is not None:  # the rollout swaps weights between requests
                        await ahead[0]
                    self.reporter.check_stop()  # never upload after a cancel
                    t0 = time.monotonic()
                    await self.publish(done)
                    values["time/publish"] = time.monotonic() - t0
                if evaluating:
                    values |= await self.evaluate(done)
                window.append(values)
                last = values
                if _every(done, c.log_every) or end or evaluating:
                    self.reporter.metrics(done, average(window))
                    window = []
                if done == 1 or _every(done, c.samples_every or c.log_every * 10):
                    self.reporter.samples(done, shown(trajectories))
                if _every(done, c.save_every):
                    self.save(done)
        finally:
            if ahead is not None:
                for task in ahead:
                    task.cancel()
                await asyncio.gather(*ahead, return_exceptions=True)
        return last | {"train_runtime": time.monotonic() - started}

    def _ahead(self, step: int) -> tuple[asyncio.Task[Generated], asyncio.Task[Rollout]]:
        """Step `step`'s batch, generated and scored in the background: (generation, all)."""
        generation = asyncio.create_task(self.generate_batch(step))
        return generation, asyncio.create_task(self.score(step, generation))

    async def step(self, step: int) -> tuple[dict[str, float], Trajectories]:
        """One generation batch, scored, turned into advantages and trained on."""
        return await self.train(await self.fresh(await self.rollout(step)))

    async def fresh(self, rollout: Rollout) -> Rollout:
        """`rollout`, or when none of its samples is fresh enough to train on now (a batch
        generated ahead by a policy the sampler served late) a new one: that batch is
        dropped and reported."""
        c, samples = self.config, rollout.generated.samples
        if any(self.lag(s.policy_version) <= c.max_policy_lag for s in samples):
            return rollout
        stale = sorted({s.policy_version for s in samples})
        self.reporter.log(
            f"step {rollout.step + 1}: dropped a batch of {len(samples)} completions made by "
            f"{', '.join(stale)}, more than max_policy_lag ({c.max_policy_lag}) publications "
            f"old; generating it again with {self.policy.version}",
            "warning",
        )
        return await self.rollout(rollout.step)

    async def rollout(self, step: int) -> Rollout:
        """Step `step`'s batch, generated by the served policy and scored."""
        return await self.score(step, self.generate_batch(step))

    async def generate_batch(self, step: int) -> Generated:
        started = time.time()  # the batch's rollout: its prompts read, then Generate
        rows = await self.prompts.batch(step, self.config.prompts_per_step)
        samples, _fresh = await self.generate(rows, step)  # fresh again when it trains
        return Generated(rows, samples, started, time.time())

    async def score(self, step: int, generation: Awaitable[Generated]) -> Rollout:
        g = await generation
        c = self.config
        scores = await self.scorer.score(g.rows, g.samples, c.group_size, f"{c.tag}-s{step}")
        return Rollout(step, g, scores, time.time())

    async def train(self, rollout: Rollout) -> tuple[dict[str, float], Trajectories]:
        """Advantages and the update on a scored batch, in a thread: the loop keeps serving
        the next batch's RPCs meanwhile."""
        c, g = self.config, rollout.generated
        lags = [self.lag(s.policy_version) for s in g.samples]  # now, not when generated
        fresh = [lag <= c.max_policy_lag for lag in lags]
        trained = [
            ok and s.status is ScoreStatus.OK for ok, s in zip(fresh, rollout.scores, strict=True)
        ]
        trajectories = Trajectories(g.rows, g.samples, rollout.scores, c.group_size, trained)
        dropped = len(fresh) - sum(fresh)
        if dropped:
            self.reporter.log(
                f"step {rollout.step + 1}: dropped {dropped} of {len(fresh)} completions "
                f"made by a policy more than max_policy_lag ({c.max_policy_lag}) "
                "publications old",
                "warning",
            )
        started = time.time()
        update = await asyncio.to_thread(self._update, trajectories)
        ended = time.time()
        kept = [lag for lag in lags if lag <= c.max_policy_lag]
        tokens = sum(len(s.completion_ids) for s in g.samples)
        return {
            **rollout_metrics(trajectories),
            **update,
            "policy/stale_dropped": float(dropped),
            "policy/lag": statistics.fmean(kept) if kept else 0.0,
            # Tokens per second of the step's own work (generation to the update's end).
            "tokens_per_second": tokens / max(ended - g.started, 1e-9),
            "time/generate": g.ended - g.started,
            "time/score": rollout.scored - g.ended,
            "time/update": ended - started,
            "timeline/generate_start": g.started,
            "timeline/generate_end": g.ended,
            "timeline/update_start": started,
            "timeline/update_end": ended,
        }, trajectories

    def _update(self, trajectories: Trajectories) -> dict[str, float]:
        c = self.config
        batch = make_batch(
            trajectories.samples, trajectories.valid(), self.pad_id, self.actor.device
        )
        kl = None
        if c.kl_in_reward > 0:  # pi_old's KL to the reference, before the update
            kl = self.actor.reference_kl(batch, c.kl_estimator, c.objective.micro_batch_size)
        if self.learner is not None:  # PPO: GAE over its critic, not the estimator's
            update = self.learner.learn(self.actor, batch, trajectories)
        else:
            options = algos.AdvantageOptions(c.scale_rewards, kl_coef=c.kl_in_reward)
            advantages = compute_advantages(
                trajectories.rewards(),
                trajectories.valid(),
                c.group_size,
                batch.mask,
                c.advantage,
                options,
                kl,
            )
            update = self.actor.update(batch, advantages, c.objective)
        if kl is not None:  # the loss has no KL term: report the reward's
            update["kl"] = float((kl * batch.mask).sum() / batch.mask.sum().clamp_min(1))
        return update

    async def generate(self, rows: list[Row], step: int) -> tuple[list[Sample], list[bool]]:
        """Samples from the served policy, and which are fresh enough to train on."""
        c = self.config
        seed = c.sampling.seed + step if c.sampling.seed is not None else None
        sampling = dataclasses.replace(c.sampling, seed=seed)
        for attempt in range(2):
            try:
                samples = await self.sampler.generate(
                    rows, sampling, self.policy, f"{c.tag}-s{step}"
                )
            except PolicyLost:
                if attempt:
                    raise
                await self._serve_again(step, "lost")
                continue
            fresh = [self.lag(s.policy_version) <= c.max_policy_lag for s in samples]
            if any(fresh):
                return samples, fresh
            stale = sorted({s.policy_version for s in samples})
            if attempt:
                raise PolicyLost(
                    f"the rollout service generated with {stale}, not {self.policy.version}"
                )
            self.reporter.log(
                f"step {step + 1}: dropped a batch of {len(samples)} completions made by "
                f"{', '.join(stale)}, not a policy at most max_policy_lag ({c.max_policy_lag}) "
                f"publications old; serving {self.policy.version} again",
                "warning",
            )
            await self._serve_again(step, "stale")
        raise AssertionError("unreachable")

    def lag(self, version: str) -> float:
        """How many publications ago `version` was served (inf: not one of ours)."""
        for back, policy in enumerate(reversed(self.history)):
            if policy.version == version:
                return back
        return float("inf")

    async def _serve_again(self, step: int, why: str) -> None:
        log.warning("rl_policy_lost", step=step, why=why, policy=self.policy.version)
        await self.publisher.serve(self.policy)

    # Publish, evaluate, save ---------------------------------------------------------------

    async def publish(self, step: int) -> PolicyRef:
        folder = self.folder / POLICY
        shutil.rmtree(folder, ignore_errors=True)
        self.actor.export(folder, self.tokenizer)
        policy = await self.publisher.publish(folder, step)
        self.history = [*self.history, policy][-(self.config.max_policy_lag + 1) :]
        log.info("rl_policy_published", step=step, policy=policy.version)
        return policy

    async def evaluate(self, step: int) -> dict[str, float]:
        """The served policy on the eval rows, one sample each at the training temperature with
        a fixed seed (comparable across steps); keys prefixed `eval_`."""
        sampling = dataclasses.replace(self.config.sampling, n=1)
        t0 = time.monotonic()
        metrics = await evaluate(
            self.eval_rows,
            self.sampler,
            self.scorer,
            sampling,
            self.policy,
            f"{self.config.tag}-eval-s{step}",
            lambda done: self.reporter.check_stop(),
        )
        values = {f"eval_{k}": v for k, v in metrics.items()}
        return values | {"time/eval": time.monotonic() - t0}

    def save(self, step: int) -> None:
        """The resume point: the state file, then the marker naming it, replaced in one
        rename (a crash before it leaves the previous state in force), then the event."""
        folder = self.folder / CHECKPOINTS
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "policy": dataclasses.asdict(self.policy),
            "actor": self.actor.state_dict(),
            **({"learner": self.learner.state_dict()} if self.learner is not None else {}),
        }
        name = STATE_FILE.format(step=step)
        torch.save(state, folder / f"{name}.tmp")
        (folder / f"{name}.tmp").replace(folder / name)
        marker = folder / CHECKPOINT_MARKER
        marker.with_suffix(".tmp").write_text(json.dumps({"step": step, "state": name}))
        marker.with_suffix(".tmp").replace(marker)
        for old in folder.glob(STATE_FILE.format(step="*")):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.reporter.checkpoint(step, self.policy)


def saved_state(folder: Path) -> Path | None:
    """The state file the marker in `folder` names (None: no resume state); a job saved
    before markers existed has its one `grpo-state.pt`."""
    try:
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError):
        legacy = folder / LEGACY_STATE_FILE
        return legacy if legacy.is_file() else None
    path = folder / str(marker.get("state", ""))
    return path if marker.get("state") and path.is_file() else None


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def rollout_metrics(t: Trajectories) -> dict[str, float]:
    """What the samples and their scores say: reward (OK samples) overall and per scorer, status
    counts, groups without a learning signal, completion lengths and truncation."""
    ok = [s.reward for s in t.scores if s.status is ScoreStatus.OK]
    lengths = [len(s.completion_ids) for s in t.samples]
    values = {
        "reward_mean": statistics.fmean(ok) if ok else 0.0,
        "reward_std": statistics.pstdev(ok) if ok else 0.0,
        "valid_fraction": len(ok) / len(t.scores),
        "frac_reward_zero_std": _zero_std_fraction(t),
        "completions/mean_length": statistics.fmean(lengths),
        "completions/min_length": float(min(lengths)),
        "completions/max_length": float(max(lengths)),
        "truncated_ratio": sum(s.truncated for s in t.samples) / len(t.samples),
        "tokens": float(sum(lengths)),
    }
    for status in ScoreStatus:
        values[f"status/{status}"] = float(sum(s.status is status for s in t.scores))
    per_scorer: dict[str, list[float]] = {}
    for s in t.scores:
        for name, value in s.scorers.items():
            per_scorer.setdefault(name, []).append(value)
    for name, scored in per_scorer.items():
        values[f"rewards/{name}/mean"] = statistics.fmean(scored)
        values[f"rewards/{name}/std"] = statistics.pstdev(scored)
    return values


def _zero_std_fraction(t: Trajectories) -> float:
    """Share of groups whose OK rewards are all equal (or fewer than two): advantage 0, no
    learning signal from that prompt (TRL's `frac_reward_zero_std`)."""
    g, flat = t.group_size, 0
    groups = len(t.scores) // g
    for b in range(groups):
        ok = [s.reward for s in t.scores[b * g : b * g + g] if s.status is ScoreStatus.OK]
        flat += len(ok) < 2 or max(ok) - min(ok) < 1e-6
    return flat / max(groups, 1)


# Reducers over a logging window: extremes stay extremes, the rest is averaged.
REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "completions/min_length": min,
    "completions/max_length": max,
    "importance_ratio_max": max,
    "timeline/generate_start": min,
    "timeline/update_start": min,
    "timeline/generate_end": max,
    "timeline/update_end": max,
}


def average(window: list[dict[str, float]]) -> dict[str, float]:
    """Per-step metrics over a logging window -> one value per key."""
    keys = {k for values in window for k in values}
    out = {}
    for key in sorted(keys):
        seen = [values[key] for values in window if key in values]
        out[key] = REDUCERS.get(key, statistics.fmean)(seen)
    return out


def shown(t: Trajectories) -> list[dict[str, Any]]:
    """The first sample of the first few groups, with its reward: what users read to see what
    the policy does."""
    out = []
    for i in range(0, min(len(t.samples), SAMPLES_SHOWN * t.group_size), t.group_size):
        score = t.scores[i]
        out.append(
            {
                "prompt": str(t.rows[i // t.group_size].get("prompt", ""))[:TEXT_SHOWN],
                "completion": t.samples[i].text[:TEXT_SHOWN],
                "status": str(score.status),
                "reward": score.reward if score.status is ScoreStatus.OK else None,
            }
        )
    return out
