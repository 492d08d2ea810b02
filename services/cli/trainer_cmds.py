"""`tlm jobs ...`: training jobs from the shell. Each command is one or two trainer RPCs;
`watch` renders step events as a progress bar. Mounted by main.py as `jobs_app`."""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli import errors
from services.cli.errors import HandledGroup, UserError
from services.cli.job_spec import SpecError, build_spec, read_spec_file
from services.cli.plots import OVERVIEW, main_metric, metric_series, write_plots
from services.clients.trainer import TrainerClient
from services.common import proto_json
from services.common.errors import DeadlineExceeded
from tlm.trainer.v1 import trainer_pb2 as pb

T = TypeVar("T")
console = Console()
jobs_app = typer.Typer(cls=HandledGroup, help="Training and evaluation jobs.", no_args_is_help=True)
AddressOpt = Annotated[str | None, typer.Option(help="Trainer address.")]
ENDED = (
    pb.TrainingJob.STATE_SUCCEEDED,
    pb.TrainingJob.STATE_FAILED,
    pb.TrainingJob.STATE_CANCELLED,
)
STATE_COLOURS = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow"}
STATES = ", ".join(proto_json.choices(pb.TrainingJob.State))  # what --state takes
METHODS = ", ".join(proto_json.choices(pb.Method))


def job_name(job: str) -> str:
    """'j-1' or 'jobs/j-1' -> 'jobs/j-1'."""
    return job if job.startswith("jobs/") else f"jobs/{job}"


def call(address: str | None, fn: Callable[[TrainerClient], Awaitable[T]]) -> T:
    """Run `fn` with a trainer client; its errors are reported by services/cli/errors.py."""
    return errors.call(TrainerClient, address, fn)


def state_name(state: int) -> str:
    """`RUNNING`, as tables and messages show a state (the enum value is `STATE_RUNNING`)."""
    return proto_json.short_name(pb.TrainingJob.State, state)


def _flag(enum: proto_json.EnumLike, flag: str, value: str | None) -> int:
    """A flag's enum value (`--state running`), 0 when not given; UserError naming the choices."""
    if not value:
        return 0
    try:
        return proto_json.enum_number(enum, value)
    except ValueError as exc:
        raise UserError(f"{flag}: {exc}") from exc


def show_json(message: object) -> None:
    text = json_format.MessageToJson(message, preserving_proto_field_name=True)  # type: ignore[arg-type]
    console.print_json(text)


@jobs_app.command("create")
def create(
    method: Annotated[
        str | None, typer.Option(help="sft, dpo, kto, reward_model, grpo, evaluate")
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="NAME\\[@REV] of the base model")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="NAME\\[@REV] of the training (or eval) data")
    ] = None,
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", help="A TrainingJobSpec in proto JSON or YAML; flags override it"),
    ] = None,
    eval_dataset: Annotated[str | None, typer.Option(help="NAME\\[@REV] of held-out data")] = None,
    evaluator: Annotated[str | None, typer.Option(help="NAME\\[@REV] of an evaluator")] = None,
    lora: Annotated[
        bool | None, typer.Option("--lora/--full", help="LoRA (default) or full")
    ] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (default 16)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (0: from epochs)")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Examples (prompts) per device per step")
    ] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest tokenised example")] = None,
    log_every: Annotated[
        int | None, typer.Option(help="Metrics every N steps (default 10)")
    ] = None,
    output_model: Annotated[str | None, typer.Option(help="models/NAME for the result")] = None,
    num_generations: Annotated[
        int | None, typer.Option(help="GRPO: completions per prompt, G (default 8)")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="GRPO/evaluate: new tokens per completion (default 64)")
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="GRPO/evaluate: sampling temperature (default 1)")
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="GRPO: KL coefficient (default 0.04); DPO/KTO: beta")
    ] = None,
    epsilon: Annotated[float | None, typer.Option(help="GRPO: clip range (default 0.2)")] = None,
    loss_type: Annotated[
        str | None, typer.Option(help="GRPO: grpo, dr_grpo, dapo, bnpo; DPO: sigmoid, hinge, ipo")
    ] = None,
    scale_rewards: Annotated[
        str | None, typer.Option(help="GRPO: group, batch or none (default group)")
    ] = None,
    advantage_estimator: Annotated[
        str | None, typer.Option(help="GRPO: grpo, rloo or reinforce_pp (default grpo)")
    ] = None,
    kl_estimator: Annotated[
        str | None, typer.Option(help="GRPO with rloo/reinforce_pp: KL in the reward, k1 or k2")
    ] = None,
    num_iterations: Annotated[
        int | None, typer.Option(help="GRPO: updates per batch, mu (default 1)")
    ] = None,
    sync_every: Annotated[
        int | None, typer.Option(help="GRPO/PPO: steps between policy syncs (default 1)")
    ] = None,
    publish_every: Annotated[
        int | None,
        typer.Option(help="GRPO/PPO: steps between registry revisions (default 0: checkpoints)"),
    ] = None,
    max_policy_lag: Annotated[
        int | None,
        typer.Option(help="GRPO: 1 generates the next batch while this one trains (default 0)"),
    ] = None,
    kl_coef: Annotated[
        float | None, typer.Option(help="PPO: KL penalty in the reward (default 0.05)")
    ] = None,
    target_kl: Annotated[
        float | None, typer.Option(help="PPO: adaptive KL target per token (default 0: fixed)")
    ] = None,
    cliprange: Annotated[float | None, typer.Option(help="PPO: clip range (default 0.2)")] = None,
    cliprange_value: Annotated[
        float | None, typer.Option(help="PPO: value clip range (default 0.2)")
    ] = None,
    vf_coef: Annotated[
        float | None, typer.Option(help="PPO: value loss coefficient (default 0.1)")
    ] = None,
    gamma: Annotated[float | None, typer.Option(help="PPO: discount (default 1)")] = None,
    lam: Annotated[float | None, typer.Option(help="PPO: GAE lambda (default 0.95)")] = None,
    ppo_epochs: Annotated[
        int | None, typer.Option(help="PPO: epochs per batch (default 4)")
    ] = None,
    num_mini_batches: Annotated[
        int | None, typer.Option(help="PPO: mini-batches per epoch (default 1)")
    ] = None,
    entropy_coef: Annotated[
        float | None, typer.Option(help="PPO: entropy bonus (default 0)")
    ] = None,
    critic_model: Annotated[
        str | None, typer.Option(help="PPO: NAME\\[@REV] of the critic's start (default: base)")
    ] = None,
    critic_learning_rate: Annotated[
        float | None, typer.Option(help="PPO: the critic's learning rate (default: the policy's)")
    ] = None,
    samples_per_prompt: Annotated[
        int | None, typer.Option(help="PPO: completions per prompt, sampling.n (default 1)")
    ] = None,
    request_id: Annotated[str, typer.Option(help="Idempotency key")] = "",
    display_name: Annotated[str, typer.Option(help="Free text")] = "",
    validate_only: Annotated[bool, typer.Option(help="Check and fill defaults only")] = False,
    watch_job: Annotated[bool, typer.Option("--watch", help="Follow it to the end")] = False,
    address: AddressOpt = None,
) -> None:
    """Create a job; prints its name (or, with --validate-only, the filled-in spec).

    Everything not set by a flag comes from --spec (a TrainingJobSpec, `tlm jobs show`'s
    `spec`), else from the service's defaults."""
    flags = {k: v for k, v in locals().items() if k not in NOT_SPEC}
    spec = spec_from(spec_file, method, flags)
    request = pb.CreateTrainingJobRequest(
        spec=spec, request_id=request_id, display_name=display_name, validate_only=validate_only
    )
    job = call(address, lambda c: c.create_job(request))
    if validate_only:
        show_json(job)
        return
    console.print(f"{job.name} {state_name(job.state)}")
    if watch_job:
        watch(job.name, address=address)


# create's parameters that are not spec fields.
NOT_SPEC = frozenset(
    {"method", "spec_file", "request_id", "display_name", "validate_only", "watch_job", "address"}
)


def spec_from(
    spec_file: Path | None, method: str | None, flags: Mapping[str, object]
) -> pb.TrainingJobSpec:
    """The spec `create`'s (and `estimate`'s) flags describe, on top of --spec's file."""
    try:
        base = read_spec_file(spec_file) if spec_file is not None else None
        return build_spec(base, method, flags)
    except SpecError as exc:
        raise UserError(str(exc)) from exc


@jobs_app.command("list")
def list_jobs(
    state: Annotated[str | None, typer.Option(help=f"Only jobs in this state: {STATES}")] = None,
    method: Annotated[str | None, typer.Option(help=f"Only jobs of this method: {METHODS}")] = None,
    page_size: Annotated[int, typer.Option(help="Jobs per call (all are listed)")] = 50,
    address: AddressOpt = None,
) -> None:
    """The team's jobs, newest first."""
    request = pb.ListTrainingJobsRequest(
        page_size=page_size,
        state=_flag(pb.TrainingJob.State, "--state", state),  # type: ignore[arg-type]
        method=_flag(pb.Method, "--method", method),  # type: ignore[arg-type]
    )
    jobs = call(address, lambda c: c.list_jobs(request))
    table = Table("job", "method", "state", "step", "output")
    for job in jobs:
        colour = STATE_COLOURS.get(state_name(job.state), "white")
        table.add_row(
            job.name,
            proto_json.short_name(pb.Method, job.spec.method),
            f"[{colour}]{state_name(job.state)}[/]",
            f"{job.progress.step}/{job.progress.total_steps}",
            job.output_model_revision,
        )
    console.print(table)


@jobs_app.command("show")
def show(job: str, address: AddressOpt = None) -> None:
    """A job as JSON: spec with defaults, state, progress, result or error."""
    show_json(call(address, lambda c: c.get_job(job_name(job))))


@jobs_app.command("cancel")
def cancel(job: str, address: AddressOpt = None) -> None:
    """Ask a job to stop."""
    result = call(address, lambda c: c.cancel_job(job_name(job)))
    console.print(f"{result.name} {state_name(result.state)}")


@jobs_app.command("watch")
def watch(job: str, from_sequence: int = 0, address: AddressOpt = None) -> None:
    """Follow a job's events: a progress bar over steps, state changes and the result."""
    final = call(address, lambda c: render(c.watch(job_name(job), from_sequence)))
    if final not in ("SUCCEEDED", ""):
        raise typer.Exit(1)


def _steps(message: str) -> int | None:
    """'training started: 40 steps' -> 40 (the service's log line when a worker begins)."""
    try:
        return int(message.split(": ")[1].split()[0]) or None
    except (IndexError, ValueError):
        return None


# What the progress line shows: (label, metric names, first present wins).
LIVE = (*OVERVIEW, ("lr", ("learning_rate",)))


def progress_line(values: Mapping[str, float]) -> str:
    """The step's reward, KL, loss and learning rate, those present.

    >>> progress_line({"loss": 0.5, "reward_mean": 0.25, "kl": 0.001, "grad_norm": 3.0})
    'reward=0.25 KL=0.001 loss=0.5'
    """
    shown = [(label, main_metric(values, names)) for label, names in LIVE]
    return " ".join(f"{label}={values[name]:.4g}" for label, name in shown if name)


async def render(events: AsyncIterable[pb.JobEvent]) -> str:
    """Draw the events; returns the last state seen."""
    last_state = ""
    latest: dict[str, float] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("steps", total=None, metrics="")
        async for event in events:
            kind = event.WhichOneof("event")
            if kind == "state_change":
                last_state = state_name(event.state_change.state)
                colour = STATE_COLOURS.get(last_state, "cyan")
                progress.console.print(
                    f"[{colour}]{last_state}[/] {escape(event.state_change.message)}"
                )
            elif kind == "log":
                progress.console.print(f"[dim]{event.log.level}: {escape(event.log.message)}[/]")
                if event.log.message.startswith("training started: "):
                    progress.update(task, total=_steps(event.log.message))
            elif kind == "metrics":
                latest.update(event.metrics.values)  # an eval-only event keeps the rest shown
                shown = progress_line(latest)
                progress.update(task, completed=event.metrics.step, metrics=shown)
            elif kind == "checkpoint":
                progress.console.print(f"checkpoint at step {event.checkpoint.step}")
            elif kind == "result":
                result = event.result
                progress.console.print(f"[bold]result[/] {result.output_model_revision}")
                for key in sorted(result.metrics):
                    progress.console.print(f"  {key} = {result.metrics[key]:.6g}")
    return last_state


@jobs_app.command("plot")
def plot(
    job: str,
    out: Annotated[Path, typer.Option(help="Folder for the PNG files (created)")],
    metric: Annotated[
        list[str] | None, typer.Option(help="Plot only this metric (repeat it); default all")
    ] = None,
    address: AddressOpt = None,
) -> None:
    """PNG plots of a job's step metrics: overview.png (reward, KL, loss) and one per metric.

    A job that is still running is plotted up to its latest step."""
    job_message, events = read_job(address, job)
    series = metric_series(events)
    if not series:
        raise UserError(f"{job_message.name} has no step metrics yet")
    missing = [m for m in metric or [] if m not in series]
    if missing:
        raise UserError(f"no metric {', '.join(missing)}; the job has {', '.join(series)}")
    try:
        paths = write_plots(series, out, metric)
    except OSError as exc:
        raise UserError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    for path in paths:
        console.print(str(path))


# How long `plot` listens for the events of a job that is still running.
RUNNING_READ_S = 3.0


def read_job(address: str | None, job: str) -> tuple[pb.TrainingJob, list[pb.JobEvent]]:
    """The job and every event it has so far (errors reported as every command's)."""
    name = job_name(job)

    async def rpc(c: TrainerClient) -> tuple[pb.TrainingJob, list[pb.JobEvent]]:
        found = await c.get_job(name)
        ended = found.state in ENDED
        events: list[pb.JobEvent] = []
        try:
            async for event in c.watch(name, timeout_s=None if ended else RUNNING_READ_S):
                events.append(event)
        except DeadlineExceeded:  # a running job: its events so far
            if ended:
                raise
        return found, events

    return call(address, rpc)
