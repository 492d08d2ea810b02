"""The online-RL controller driven through in-memory ports and a real tiny-model actor.

The fakes implement the protocols of `rl/ports.py` as plain classes: a prompt source of fixed
rows, a sampler that answers every prompt with the same G completions (half end in token
GOOD, half in BAD), a scorer that rewards GOOD, and a publisher that numbers its policies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from services.trainer.domain import Method
from services.trainer.grpo import loss_config
from services.trainer.rl import LossType, algos
from services.trainer.rl.actor import Actor, Objective, build_actor
from services.trainer.rl.batch import Row, Sample, Score, ScoreStatus, Trajectories, make_batch
from services.trainer.rl.controller import (
    Controller,
    ControllerConfig,
    average,
    rollout_metrics,
    saved_state,
)
from services.trainer.rl.ports import PolicyLost, PolicyRef
from services.trainer.spec import GrpoParams, JobSpec, Sampling, TrainingParams
from services.trainer.worker_protocol import CHECKPOINTS

# Every test trains the tiny model through the controller (seconds in all).
pytestmark = pytest.mark.slow
BASE = "models/tiny/revisions/1"
GOOD, BAD = 7, 9  # token ids the fake sampler ends completions with
PROMPT = [3, 4, 5]
G = 4


# Fakes ------------------------------------------------------------------------------------


class FakePrompts:
    def __init__(self, rows: int = 4) -> None:
        self.rows: list[Row] = [{"prompt": f"q{i}", "answer": i} for i in range(rows)]
        self.asked: list[int] = []

    async def open(self) -> int:
        return len(self.rows)

    async def batch(self, step: int, size: int) -> list[Row]:
        self.asked.append(step)
        return [self.rows[(step * size + i) % len(self.rows)] for i in range(size)]

    async def read(self, limit: int = 0) -> list[Row]:
        return self.rows[: limit or None]


@dataclass
class FakeSampler:
    """G samples per row: [GOOD], [1, GOOD], [BAD], [1, BAD], ... made by `serving`; the ones
    listed in `stale_at[call]` report `stale_version` instead."""

    serving: str = BASE
    calls: list[tuple[int, int | None, str]] = field(default_factory=list)  # rows, seed, version
    versions: list[str] = field(default_factory=list)  # forced versions, one per call
    stale_version: str = ""
    stale_samples: tuple[int, ...] = ()

    async def generate(
        self, rows: list[Row], sampling: Sampling, policy: PolicyRef, request_id: str
    ) -> list[Sample]:
        self.calls.append((len(rows), sampling.seed, policy.version))
        version = self.versions.pop(0) if self.versions else self.serving
        out: list[Sample] = []
        for _ in rows:
            for k in range(sampling.n):
                completion = ([1] * (k // 2 % 2)) + [GOOD if k % 2 == 0 else BAD]
                stale = len(out) in self.stale_samples and self.stale_version
                out.append(
                    Sample(
                        PROMPT,
                        completion,
                        [-1.0] * len(completion),
                        "good" if k % 2 == 0 else "bad",
                        self.stale_version if stale else version,
                        truncated=len(completion) == 2,
                    )
                )
        return out


@dataclass
class FakeScorer:
    """Reward 1 for a completion ending in GOOD, 0 for BAD; BAD ones are UNSCORABLE (with a
    reward that must never be read) when `unscorable_bad`."""

    unscorable_bad: bool = False
    calls: int = 0

    async def score(
        self, rows: list[Row], samples: list[Sample], group_size: int, tag: str
    ) -> list[Score]:
        self.calls += 1
        out = []
        for s in samples:
            good = s.completion_ids[-1] == GOOD
            if not good and self.unscorable_bad:
                out.append(Score(ScoreStatus.UNSCORABLE, float("nan")))
            else:
                value = 1.0 if good else 0.0
                out.append(Score(ScoreStatus.OK, value, {"good": value, "short": 0.5}))
        return out


@dataclass
class FakePublisher:
    sampler: FakeSampler
    served: list[PolicyRef | None] = field(default_factory=list)
    published: list[int] = field(default_factory=list)

    async def serve(self, policy: PolicyRef | None) -> PolicyRef:
        self.served.append(policy)
        policy = policy or PolicyRef(BASE)
        self.sampler.serving = policy.version
        return policy

    async def publish(self, folder: Path, step: int) -> PolicyRef:
        assert any(folder.iterdir())  # the actor exported its weights there
        self.published.append(step)
        self.sampler.serving = f"models/tiny-grpo/revisions/{step}"
        return PolicyRef(self.sampler.serving, step=step)


class Reporter:
    """Records the controller's events."""

    def __init__(self) -> None:
        self.metric_events: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[int] = []
        self.sample_events: list[tuple[int, list[dict[str, Any]]]] = []
        self.logs: list[tuple[str, str]] = []  # (level, message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.metric_events.append((step, values))

    def checkpoint(self, step: int, policy: PolicyRef) -> None:
        self.checkpoints.append(step)

    def samples(self, step: int, shown: list[dict[str, Any]]) -> None:
        self.sample_events.append((step, shown))

    def log(self, message: str, level: str = "info") -> None:
        self.logs.append((level, message))

    def check_stop(self) -> None:
        pass


# Wiring ----------------------------------------------------------------------------------


def job(lr: float = 1e-3, beta: float = 0.0, loss_type: str = "grpo") -> JobSpec:
    params = GrpoParams(
        num_generations=G,
        sampling=Sampling(n=G, max_tokens=2),
        beta=beta,
        loss_type=loss_type,
        importance_sampling_correction=False,
    )
    training = TrainingParams(learning_rate=lr, warmup_ratio=0.0, lr_scheduler="constant")
    return JobSpec(
        Method.GRPO, BASE, "datasets/p/revisions/1", None, training=training, params=params
    )


def actor(model_dir: Path, spec: JobSpec, updates: int = 100) -> Actor:
    a = build_actor(model_dir, spec, "fp32", "cpu")
    a.configure_optimizer(spec, "fp32", updates)
    return a


def config(spec: JobSpec, steps: int, **kw: Any) -> ControllerConfig:
    params: GrpoParams = spec.params
    values: dict[str, Any] = {
        "total_steps": steps,
        "prompts_per_step": 2,
        "group_size": G,
        "sampling": replace(params.sampling, seed=10),
        "objective": Objective(loss_config(params)),
    }
    return ControllerConfig(**(values | kw))


@dataclass
class Run:
    controller: Controller
    prompts: FakePrompts
    sampler: FakeSampler
    scorer: FakeScorer
    publisher: FakePublisher
    reporter: Reporter


def make_run(
    a: Actor, spec: JobSpec, folder: Path, steps: int, scorer: FakeScorer | None = None, **kw: Any
) -> Run:
    prompts, sampler = FakePrompts(), FakeSampler()
    scorer = scorer or FakeScorer()
    publisher, reporter = FakePublisher(sampler), Reporter()
    eval_rows = kw.pop("eval_rows", None)
    controller = Controller(
        config(spec, steps, **kw),
        a,
        prompts,
        sampler,
        scorer,
        publisher,
        reporter,
        folder,
        eval_rows=eval_rows,
    )
    return Run(controller, prompts, sampler, scorer, publisher, reporter)


def p_token(a: Actor, completion: list[int]) -> float:
    """pi(last token of completion | PROMPT + the rest)."""
    sample = Sample(PROMPT, completion, [0.0] * len(completion), "", BASE)
    batch = make_batch([sample], torch.tensor([True]), 0)
    with torch.no_grad():
        return math.exp(float(a.logprobs(batch)[0, len(completion) - 1]))


def weights(a: Actor) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in a.model.named_parameters() if p.requires_grad}


# Tests -----------------------------------------------------------------------------------


async def test_the_rewarded_token_becomes_more_likely(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Half of each group ends in GOOD (reward 1), half in BAD (0): after a few GRPO steps
    pi(GOOD | prompt) rises and pi(BAD | prompt) falls. Every step samples from the policy
    published by the step before, with the step's seed."""
    spec = job()
    a = actor(tiny_model_dir, spec)
    good, bad = p_token(a, [GOOD]), p_token(a, [BAD])
    run = make_run(a, spec, tmp_path, steps=4)
    await run.controller.start()
    final = await run.controller.run()
    assert p_token(a, [GOOD]) > 2 * good and p_token(a, [BAD]) < bad / 2
    assert run.publisher.published == [1, 2, 3, 4]
    assert [seed for _, seed, _ in run.sampler.calls] == [10, 11, 12, 13]
    assert [v for _, _, v in run.sampler.calls][1] == "models/tiny-grpo/revisions/1"
    assert run.controller.policy.version == "models/tiny-grpo/revisions/4"
    assert final["reward_mean"] == 0.5 and "train_runtime" in final


async def test_unscorable_samples_are_masked_never_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """BAD samples unscorable: each group's OK rewards are all 1, so every advantage is 0 and
    (beta 0, no weight decay) the weights do not move. Had they counted as reward 0, GOOD
    would have a positive advantage and the weights would change."""
    spec = job()
    a = actor(tiny_model_dir, spec)
    before = weights(a)
    run = make_run(a, spec, tmp_path, steps=1, scorer=FakeScorer(unscorable_bad=True))
    await run.controller.start()
    await run.controller.run()
    after = weights(a)
    assert all(torch.equal(before[n], after[n]) for n in before)
    ((_, values),) = run.reporter.metric_events
    assert values["status/unscorable"] == 4 and values["status/ok"] == 4
    assert values["valid_fraction"] == 0.5 and values["frac_reward_zero_std"] == 1.0
    assert values["loss"] == 0.0 and math.isfinite(values["grad_norm"])


async def test_samples_from_an_older_policy_are_dropped_beyond_the_lag(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Step 2 gets two samples made by the base, one publication old: max_policy_lag 0 drops
    them (masked), 1 keeps them."""
    spec = job()
    for lag, dropped in ((0, 2.0), (1, 0.0)):
        run = make_run(
            actor(tiny_model_dir, spec), spec, tmp_path / str(lag), 2, max_policy_lag=lag
        )
        await run.controller.start()
        run.sampler.stale_version, run.sampler.stale_samples = BASE, ()
        first, _ = await run.controller.step(0)
        await run.controller.publish(1)
        run.sampler.stale_samples = (0, 3)
        second, trajectories = await run.controller.step(1)
        assert first["policy/stale_dropped"] == 0
        assert second["policy/stale_dropped"] == dropped
        assert trajectories.trained[0] is (lag == 1) and trajectories.trained[1]


async def test_a_lost_policy_is_served_again_once_then_the_job_fails(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """All samples from a policy that is not ours: serve ours again and regenerate; twice in
    a row, PolicyLost (FAILED_PRECONDITION)."""
    spec = job()
    run = make_run(actor(tiny_model_dir, spec), spec, tmp_path, 1)
    await run.controller.start()
    run.sampler.versions = ["models/other/revisions/9"]
    _, fresh = await run.controller.generate(await run.prompts.batch(0, 2), 0)
    assert all(fresh) and run.publisher.served == [None, PolicyRef(BASE)]
    run.sampler.versions = ["models/other/revisions/9"] * 2
    with pytest.raises(PolicyLost, match="generated with"):
        await run.controller.generate(await run.prompts.batch(0, 2), 0)


async def test_checkpoint_and_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    """save_every 2 of 3 steps: the resume state is written at step 2 only (not at each sync).
    A new controller on the folder restores the actor's weights and optimizer, serves the
    policy published at step 2, and runs step 3 alone."""
    spec = job()
    a = actor(tiny_model_dir, spec)
    run = make_run(a, spec, tmp_path, 3, save_every=2)
    await run.controller.start()
    for step in range(2):
        await run.controller.step(step)
        await run.controller.publish(step + 1)
    run.controller.save(2)
    saved = weights(a)
    assert run.reporter.checkpoints == [2] and saved_state(tmp_path / CHECKPOINTS) is not None

    b = actor(tiny_model_dir, spec)
    resumed = make_run(b, spec, tmp_path, 3, save_every=2)
    assert await resumed.controller.start() == 2
    assert resumed.publisher.served == [PolicyRef("models/tiny-grpo/revisions/2", step=2)]
    assert all(torch.equal(saved[n], w) for n, w in weights(b).items())
    assert b.optimizer is not None and b.optimizer.state_dict()["state"]
    await resumed.controller.run()
    assert resumed.prompts.asked == [2] and resumed.publisher.published == [3]
    assert resumed.reporter.checkpoints == []  # 3 is not a multiple of save_every


async def test_no_resume_state_without_save_every(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = job()
    run = make_run(actor(tiny_model_dir, spec), spec, tmp_path, 2, save_every=0)
    await run.controller.start()
    await run.controller.run()
    assert run.publisher.published == [1, 2] and run.reporter.checkpoints == []
    assert saved_state(tmp_path / CHECKPOINTS) is None


@pytest.mark.parametrize("loss_type", [LossType.GRPO, LossType.DR_GRPO, LossType.DAPO])
def test_micro_batched_update_equals_one_big_batch(tiny_model_dir: Path, loss_type: str) -> None:
    """8 samples of 1 to 3 tokens (one unscorable, masked), KL on: the loss and every gradient
    of an update in micro-batches of 3 (3 + 3 + 2, accumulated) equal one forward pass of all 8."""
    spec = job(beta=0.1, loss_type=str(loss_type))
    samples = [
        Sample(PROMPT[: 1 + i % 3], [GOOD, BAD, 1][: 1 + i % 3], [-1.0] * (1 + i % 3), "", BASE)
        for i in range(8)
    ]
    rewards = torch.tensor([1.0, 0, 0.5, 2, float("nan"), 1, 0, 3])
    valid = ~rewards.isnan()
    batch = make_batch(samples, valid, 0)
    adv = algos.grpo_advantages(
        algos.AdvantageInputs(rewards, valid, G, batch.mask), algos.AdvantageOptions()
    )
    results = []
    for micro in (0, 3):
        a = actor(tiny_model_dir, spec)
        torch.manual_seed(0)
        with torch.no_grad():  # off the reference, so KL and its gradient are not 0
            for p in a.model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        objective = Objective(loss_config(spec.params), micro_batch_size=micro)
        values = a.update(batch, adv, objective)
        grads = {n: p.grad.clone() for n, p in a.model.named_parameters() if p.grad is not None}
        results.append((values, grads))
    (big, big_grads), (small, small_grads) = results
    assert big["loss"] == pytest.approx(small["loss"], abs=1e-5)
    assert big["kl"] == pytest.approx(small["kl"], abs=1e-5) and big["kl"] > 0
    assert set(big_grads) == set(small_grads)
    for name, g in big_grads.items():
        torch.testing.assert_close(small_grads[name], g, atol=1e-5, rtol=0)
    assert any(g.abs().max() > 1e-4 for g in big_grads.values())


async def test_eval_every_evaluates_the_published_policy(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """eval_every 2 of 4 steps with sync_every 3: evaluation at steps 2 and 4 publishes first
    (so it scores the trained policy), samples each eval row once, and its metrics come with
    the step's, prefixed eval_."""
    spec = job()
    rows: list[Row] = [{"prompt": "e1"}, {"prompt": "e2"}, {"prompt": "e3"}]
    run = make_run(
        actor(tiny_model_dir, spec), spec, tmp_path, 4, eval_every=2, sync_every=3, eval_rows=rows
    )
    await run.controller.start()
    await run.controller.run()
    assert run.publisher.published == [2, 3, 4]
    evals = [(n, v) for n, _, v in run.sampler.calls if n == 3]
    assert evals == [(3, "models/tiny-grpo/revisions/2"), (3, "models/tiny-grpo/revisions/4")]
    logged = {step: values for step, values in run.reporter.metric_events}
    assert logged[2]["eval_num_samples"] == 3 and logged[2]["eval_reward_mean"] == pytest.approx(
        1.0
    )
    assert "eval_reward_mean" not in logged[1] and "eval_reward_mean" in logged[4]


async def test_metrics_every_step_averaged_over_the_window(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """log_every 2 of 3 steps: metrics at 2 (steps 1-2 averaged) and 3 (the last); sample
    completions at step 1 and every samples_every."""
    spec = job()
    run = make_run(actor(tiny_model_dir, spec), spec, tmp_path, 3, log_every=2, samples_every=2)
    await run.controller.start()
    await run.controller.run()
    assert [step for step, _ in run.reporter.metric_events] == [2, 3]
    values = run.reporter.metric_events[0][1]
    expected = {
        "reward_mean", "reward_std", "rewards/good/mean", "rewards/short/mean", "status/ok",
        "frac_reward_zero_std", "entropy", "kl", "loss", "grad_norm", "learning_rate",
        "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "completions/mean_length",
        "completions/min_length", "completions/max_length", "truncated_ratio", "tokens",
        "time/generate", "time/score", "time/update", "time/publish", "logprob_mismatch",
    }  # fmt: skip
    assert expected <= set(values)
    assert values["reward_mean"] == 0.5 and values["truncated_ratio"] == 0.5
    assert values["completions/min_length"] == 1 and values["completions/max_length"] == 2
    assert values["tokens"] == 12 and values["learning_rate"] == pytest.approx(1e-3)
    assert values["entropy"] > 0
    assert [step for step, _ in run.reporter.sample_events] == [1, 2]
    shown = run.reporter.sample_events[0][1]
    assert shown[0] == {"prompt": "q0", "completion": "good", "status": "ok", "reward": 1.0}


def test_rollout_metrics_by_hand() -> None:
    """Two groups of 2: rewards (1, 0) and (UNSCORABLE, 1). OK rewards 1, 0, 1: mean 2/3, std
    sqrt(2/9) = 0.4714; the second group has one OK sample: no signal (1 of 2 groups)."""
    s = [Sample([1], [2] * n, [0.0] * n, "", BASE, truncated=n == 3) for n in (1, 3, 2, 2)]
    scores = [
        Score(ScoreStatus.OK, 1.0, {"a": 1.0}),
        Score(ScoreStatus.OK, 0.0, {"a": 0.0}),
        Score(ScoreStatus.UNSCORABLE),
        Score(ScoreStatus.OK, 1.0, {"a": 0.5}),
    ]
    t = Trajectories([{"prompt": "x"}] * 2, s, scores, 2, [True, True, False, True])
    m = rollout_metrics(t)
    assert m["reward_mean"] == pytest.approx(2 / 3) and m["reward_std"] == pytest.approx(
        0.4714, abs=1e-4
    )
    assert m["frac_reward_zero_std"] == 0.5 and m["status/unscorable"] == 1
    assert m["rewards/a/mean"] == pytest.approx(0.5) and m["truncated_ratio"] == 0.25
    assert (m["completions/mean_length"], m["tokens"]) == (2.0, 8.0)
    window = average(
        [{"loss": 1.0, "completions/min_length": 3.0}, {"loss": 2.0, "completions/min_length": 1.0}]
    )
    assert window == {"loss": 1.5, "completions/min_length": 1.0}


async def test_asynchronous_rollout_generates_the_next_batch_while_training(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """max_policy_lag 1: batch k+1 is generated (by the policy served during step k) while the
    actor trains on batch k, so its generation starts before that update ends (the loop's own
    timeline metrics); every batch after the first is one publication old, and none is dropped."""
    spec = job()
    a = actor(tiny_model_dir, spec)
    good = p_token(a, [GOOD])
    run = make_run(a, spec, tmp_path, 4, max_policy_lag=1)
    await run.controller.start()
    await run.controller.run()
    revision = "models/tiny-grpo/revisions/{}".format
    assert [v for _, _, v in run.sampler.calls] == [BASE, BASE, revision(1), revision(2)]
    assert [seed for _, seed, _ in run.sampler.calls] == [10, 11, 12, 13]
    assert run.publisher.published == [1, 2, 3, 4] and run.prompts.asked == [0, 1, 2, 3]
    steps = dict(run.reporter.metric_events)
    assert sorted(steps) == [1, 2, 3, 4]
    for k in (1, 2, 3):
        assert steps[k + 1]["timeline/generate_start"] < steps[k]["timeline/update_end"]
        assert steps[k]["timeline/update_start"] < steps[k]["timeline/update_end"]
    assert [steps[k]["policy/lag"] for k in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    assert all(steps[k]["policy/stale_dropped"] == 0 for k in steps)
    assert p_token(a, [GOOD]) > 2 * good  # it learns off-policy too
    assert not run.reporter.logs


async def test_synchronous_rollout_generates_after_the_publish(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """max_policy_lag 0: each batch comes from the policy published by the step before, and its
    generation starts after that step's update ended."""
    spec = job()
    run = make_run(actor(tiny_model_dir, spec), spec, tmp_path, 3)
    await run.controller.start()
    await run.controller.run()
    steps = dict(run.reporter.metric_events)
    for k in (1, 2):
        assert steps[k + 1]["timeline/generate_start"] > steps[k]["timeline/update_end"]
    assert [steps[k]["policy/lag"] for k in (1, 2, 3)] == [0.0, 0.0, 0.0]


async def test_stale_batches_are_dropped_counted_and_reported_under_a_forced_lag(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """max_policy_lag 1, and the sampler is forced to answer step 3's generation (made ahead,
    during step 2) with the base: one publication old when made, two when step 3 trains, so the
    batch is dropped (a warning event) and generated again by the served policy. At step 4 two
    samples come from the base: they are masked, counted in policy/stale_dropped and
    reported."""
    spec = job()
    run = make_run(actor(tiny_model_dir, spec), spec, tmp_path, 4, max_policy_lag=1)
    await run.controller.start()
    run.sampler.stale_version = BASE
    original, forced = run.sampler.generate, {2}

    async def generate(rows: list[Row], sampling: Sampling, policy: PolicyRef, rid: str) -> Any:
        step = int(rid.rsplit("-s", 1)[1])
        if step in forced:  # its first generation only
            forced.discard(step)
            run.sampler.versions = [BASE]
        run.sampler.stale_samples = (0, 5) if step == 3 else ()
        return await original(rows, sampling, policy, rid)

    run.sampler.generate = generate  # type: ignore[method-assign]
    await run.controller.run()
    assert run.publisher.published == [1, 2, 3, 4]
    steps = dict(run.reporter.metric_events)
    assert sorted(steps) == [1, 2, 3, 4]
    # Step 3 (index 2) was generated twice, the second time by the policy of step 2.
    assert [seed for _, seed, _ in run.sampler.calls] == [10, 11, 12, 12, 13]
    assert run.sampler.calls[3][2] == "models/tiny-grpo/revisions/2"
    assert steps[3]["policy/stale_dropped"] == 0 and steps[4]["policy/stale_dropped"] == 2
    warnings = [m for level, m in run.reporter.logs if level == "warning"]
    assert len(warnings) == 2
    assert warnings[0].startswith("step 3: dropped a batch of 8 completions made by " + BASE)
    assert warnings[1].startswith("step 4: dropped 2 of 8 completions")
