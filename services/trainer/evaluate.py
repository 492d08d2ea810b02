"""EVALUATE: generate on prompt rows with the rollout service, score with the reward service,
report metrics. Trains nothing and produces no model revision. It goes through the online
engine's ports and evaluation (`rl/grpc_ports.py`, `rl/evaluation.py`), as GRPO's `eval_every`
does, so there is one Generate/Score client."""

from __future__ import annotations

from typing import Any

from services.trainer.rl.evaluation import evaluate
from services.trainer.rl.grpc_ports import GrpcPromptSource, open_ports
from services.trainer.rl.ports import PolicyRef
from services.trainer.worker_io import WorkerContext


async def run(ctx: WorkerContext) -> dict[str, Any]:
    spec, params = ctx.spec, ctx.spec.params
    dataset = spec.eval_dataset or spec.train_dataset
    rows = await GrpcPromptSource(ctx.registry, ctx.team, dataset, 0).read(params.max_samples)
    ctx.events.emit("started", total_steps=len(rows))
    ports = open_ports(
        ctx.job.rollout_address, ctx.job.reward_address, spec.evaluator, ctx.api_key, ctx.team
    )

    def progress(done: int) -> None:
        ctx.events.emit("metrics", step=done, epoch=1.0, values={"generated": done})
        ctx.check_stop()

    try:
        policy = PolicyRef(await ports.rollout.serve_model(spec.base_model))
        metrics = await evaluate(
            rows, ports.sampler, ports.scorer, params.sampling, policy, ctx.job.name, progress
        )
    finally:
        await ports.close()
    ctx.events.emit("metrics", step=len(rows), epoch=1.0, values=metrics)
    return {"output_model_revision": "", "metrics": metrics}
