"""`tlm jobs ...`: training jobs from the shell. Each command is one or two trainer RPCs;
`watch` renders step events as a progress bar. Mounted by main.py as `jobs_app`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, TypeVar

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.registry_cmds import revision_name
from services.common.client import call_metadata, resolve_address, sync_channel
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

T = TypeVar("T")
console = Console()
err = Console(stderr=True)
jobs_app = typer.Typer(help="Training and evaluation jobs.", no_args_is_help=True)
AddressOpt = Annotated[str | None, typer.Option(help="Trainer address.")]
Stub = trainer_pb2_grpc.TrainerServiceStub
STATE_COLOURS = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow"}


def job_name(job: str) -> str:
    """'j-1' or 'jobs/j-1' -> 'jobs/j-1'."""
    return job if job.startswith("jobs/") else f"jobs/{job}"


def call(address: str | None, rpc: Callable[[Stub], T]) -> T:
    """Run `rpc` on a trainer stub; print gRPC errors with their field violations, exit 1."""
    from services.cli.registry_cmds import print_rpc_error

    with sync_channel(resolve_address("trainer", address)) as channel:
        try:
            return rpc(Stub(channel))
        except grpc.RpcError as exc:
            print_rpc_error(exc)  # type: ignore[arg-type]
            raise typer.Exit(1) from exc


def state_name(state: int) -> str:
    return pb.TrainingJob.State.Name(state)  # type: ignore[arg-type]


def show_json(message: object) -> None:
    text = json_format.MessageToJson(message, preserving_proto_field_name=True)  # type: ignore[arg-type]
    console.print_json(text)


@jobs_app.command("create")
def create(
    method: Annotated[str, typer.Option(help="sft, dpo, kto, reward_model, grpo, evaluate")],
    base_model: Annotated[str, typer.Option(help="NAME[@REV] of the base model")],
    dataset: Annotated[str, typer.Option(help="NAME[@REV] of the training (or eval) dataset")],
    eval_dataset: Annotated[str | None, typer.Option(help="NAME[@REV] of held-out data")] = None,
    evaluator: Annotated[str | None, typer.Option(help="NAME[@REV] of an evaluator")] = None,
    lora: Annotated[bool, typer.Option("--lora/--full", help="LoRA (default) or full")] = True,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (default 16)")] = None,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (0: from epochs)")] = 0,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per device per step")] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest tokenised example")] = None,
    output_model: Annotated[str | None, typer.Option(help="models/NAME for the result")] = None,
    num_generations: Annotated[
        int | None, typer.Option(help="GRPO: completions per prompt, G (default 8)")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="GRPO/evaluate: new tokens per completion (default 64)")
    ] = None,
    request_id: Annotated[str, typer.Option(help="Idempotency key")] = "",
    display_name: Annotated[str, typer.Option(help="Free text")] = "",
    validate_only: Annotated[bool, typer.Option(help="Check and fill defaults only")] = False,
    watch_job: Annotated[bool, typer.Option("--watch", help="Follow it to the end")] = False,
    address: AddressOpt = None,
) -> None:
    """Create a job; prints its name (or, with --validate-only, the filled-in spec)."""
    try:
        method_value = pb.Method.Value(method.upper())
    except ValueError as exc:
        err.print(f"[red]unknown method[/] {method!r}")
        raise typer.Exit(2) from exc
    training = pb.TrainingParams(max_steps=max_steps)
    for field, value in (
        ("epochs", epochs),
        ("learning_rate", learning_rate),
        ("per_device_batch_size", batch_size),
        ("max_length", max_length),
    ):
        if value is not None:
            setattr(training, field, value)
    tuning = pb.Tuning(lora=pb.LoraConfig()) if lora else pb.Tuning(full=pb.FullTuning())
    if lora and lora_r is not None:
        tuning.lora.r = lora_r
    spec = pb.TrainingJobSpec(
        method=method_value,
        base_model=revision_name("models", base_model),
        train_dataset=revision_name("datasets", dataset),
        eval_dataset=revision_name("datasets", eval_dataset) if eval_dataset else "",
        evaluator=revision_name("evaluators", evaluator) if evaluator else "",
        output_model=output_model or "",
        tuning=tuning,
        training=training,
    )
    if method_value == pb.EVALUATE and not eval_dataset:
        spec.eval_dataset, spec.train_dataset = spec.train_dataset, ""
    if method_value == pb.GRPO:
        spec.grpo.SetInParent()
        if num_generations is not None:
            spec.grpo.num_generations = num_generations
        if max_tokens is not None:
            spec.grpo.sampling.max_tokens = max_tokens
    elif method_value == pb.EVALUATE and max_tokens is not None:
        spec.evaluate.sampling.max_tokens = max_tokens
    request = pb.CreateTrainingJobRequest(
        spec=spec, request_id=request_id, display_name=display_name, validate_only=validate_only
    )
    job = call(address, lambda s: s.CreateTrainingJob(request, metadata=call_metadata()))
    if validate_only:
        show_json(job)
        return
    console.print(f"{job.name} {state_name(job.state)}")
    if watch_job:
        watch(job.name, address=address)


@jobs_app.command("list")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="Only jobs in this state")] = None,
    method: Annotated[str | None, typer.Option(help="Only jobs of this method")] = None,
    page_size: Annotated[int, typer.Option(help="Jobs per page")] = 50,
    address: AddressOpt = None,
) -> None:
    """The team's jobs, newest first."""
    request = pb.ListTrainingJobsRequest(
        page_size=page_size,
        state=pb.TrainingJob.State.Value(state.upper()) if state else 0,  # type: ignore[arg-type]
        method=pb.Method.Value(method.upper()) if method else 0,  # type: ignore[arg-type]
    )
    response = call(address, lambda s: s.ListTrainingJobs(request, metadata=call_metadata()))
    table = Table("job", "method", "state", "step", "output")
    for job in response.jobs:
        colour = STATE_COLOURS.get(state_name(job.state), "white")
        table.add_row(
            job.name,
            pb.Method.Name(job.spec.method),
            f"[{colour}]{state_name(job.state)}[/]",
            f"{job.progress.step}/{job.progress.total_steps}",
            job.output_model_revision,
        )
    console.print(table)


@jobs_app.command("show")
def show(job: str, address: AddressOpt = None) -> None:
    """A job as JSON: spec with defaults, state, progress, result or error."""
    request = pb.GetTrainingJobRequest(name=job_name(job))
    show_json(call(address, lambda s: s.GetTrainingJob(request, metadata=call_metadata())))


@jobs_app.command("cancel")
def cancel(job: str, address: AddressOpt = None) -> None:
    """Ask a job to stop."""
    request = pb.CancelTrainingJobRequest(name=job_name(job))
    result = call(address, lambda s: s.CancelTrainingJob(request, metadata=call_metadata()))
    console.print(f"{result.name} {state_name(result.state)}")


@jobs_app.command("watch")
def watch(job: str, from_sequence: int = 0, address: AddressOpt = None) -> None:
    """Follow a job's events: a progress bar over steps, state changes and the result."""
    request = pb.WatchTrainingJobRequest(name=job_name(job), from_sequence=from_sequence)
    final = call(address, lambda s: render(s.WatchTrainingJob(request, metadata=call_metadata())))
    if final not in ("SUCCEEDED", ""):
        raise typer.Exit(1)


def _steps(message: str) -> int | None:
    """'training started: 40 steps' -> 40 (the service's log line when a worker begins)."""
    try:
        return int(message.split(": ")[1].split()[0]) or None
    except (IndexError, ValueError):
        return None


def render(events: Iterable[pb.JobEvent]) -> str:
    """Draw the events; returns the last state seen."""
    last_state = ""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("steps", total=None, metrics="")
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "state_change":
                last_state = state_name(event.state_change.state)
                colour = STATE_COLOURS.get(last_state, "cyan")
                progress.console.print(f"[{colour}]{last_state}[/] {event.state_change.message}")
            elif kind == "log":
                progress.console.print(f"[dim]{event.log.level}: {event.log.message}[/]")
                if event.log.message.startswith("training started: "):
                    progress.update(task, total=_steps(event.log.message))
            elif kind == "metrics":
                values = event.metrics.values
                shown = " ".join(
                    f"{k}={values[k]:.4g}" for k in ("loss", "learning_rate") if k in values
                )
                progress.update(task, completed=event.metrics.step, metrics=shown)
            elif kind == "checkpoint":
                progress.console.print(f"checkpoint at step {event.checkpoint.step}")
            elif kind == "result":
                result = event.result
                progress.console.print(f"[bold]result[/] {result.output_model_revision}")
                for key in sorted(result.metrics):
                    progress.console.print(f"  {key} = {result.metrics[key]:.6g}")
    return last_state
