"""CLI for evaluators and scoring: `tlm evaluators init|validate|push` and `tlm score`.

Mount with `app.add_typer(evaluators_app, name="evaluators")` (or add its commands to an
existing evaluators group) and `app.command("score")(score)`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from services.common.client import call_metadata, resolve_address, sync_channel
from services.registry.client import RegistryClient
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

evaluators_app = typer.Typer(help="Evaluator specs: init, validate, push.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

AddressOpt = Annotated[str | None, typer.Option(help="Service address (host:port).")]
BATCH = 256


TEMPLATES: dict[str, dict[str, Any]] = {
    "math": {
        "description": "Format plus math answer equivalence (GRPO on math).",
        "scorers": [
            {"name": "format", "weight": 0.2, "format": {"tags": ["think", "answer"]}},
            {"name": "correct", "weight": 1.0, "math": {"extraction": {"tag": "answer"}}},
        ],
        "gates": [{"scorer": "format", "reward": -1.0}],
    },
    "code": {
        "description": "Run the completion's last code block against the row's tests.",
        "scorers": [
            {
                "name": "tests",
                "code": {"tests_field": "tests", "timeout": "10s", "memory_mb": 512},
            }
        ],
    },
    "format": {
        "description": "Reasoning format and a length budget.",
        "scorers": [
            {"name": "format", "format": {"tags": ["think", "answer"], "partial_credit": True}},
            {"name": "length", "weight": 0.2, "length": {"unit": "WORDS", "max_length": 400}},
        ],
    },
}


def _reward_stub(address: str | None) -> tuple[rs_grpc.RewardServiceStub, grpc.Channel]:
    channel = sync_channel(resolve_address("reward", address))
    return rs_grpc.RewardServiceStub(channel), channel


def _fail(err: grpc.RpcError) -> typer.Exit:
    err_console.print(f"[red]{err.code().name}[/]: {err.details()}")  # type: ignore[attr-defined]
    return typer.Exit(1)


@evaluators_app.command("init")
def init(
    template: Annotated[
        str, typer.Option(help="Starter evaluator: math, code or format.")
    ] = "math",
) -> None:
    """Print a starter evaluator JSON."""
    if template not in TEMPLATES:
        err_console.print(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
        raise typer.Exit(2)
    typer.echo(json.dumps(TEMPLATES[template], indent=2))


def _validate(path: Path, address: str | None) -> rs.ValidateEvaluatorResponse:
    stub, channel = _reward_stub(address)
    with channel:
        request = rs.ValidateEvaluatorRequest(spec_json=path.read_text())
        try:
            return stub.ValidateEvaluator(request, metadata=call_metadata(), timeout=30)
        except grpc.RpcError as err:
            raise _fail(err) from err


def _print_errors(response: rs.ValidateEvaluatorResponse) -> None:
    table = Table("path", "problem", title="evaluator errors")
    for e in response.errors:
        table.add_row(e.path, e.message)
    err_console.print(table)


@evaluators_app.command("validate")
def validate(file: Path, address: AddressOpt = None) -> None:
    """Validate an evaluator JSON file; prints every error with its JSON path."""
    response = _validate(file, address)
    if not response.valid:
        _print_errors(response)
        raise typer.Exit(1)
    console.print("[green]valid[/]")
    console.print_json(response.normalized_json)


@evaluators_app.command("push")
def push(
    name: str, file: Path, address: AddressOpt = None, registry_address: AddressOpt = None
) -> None:
    """Validate FILE, then store it as a new revision of evaluator NAME in the registry."""
    response = _validate(file, address)
    if not response.valid:
        _print_errors(response)
        raise typer.Exit(1)

    async def create() -> str:
        client = RegistryClient(resolve_address("registry", registry_address))
        try:
            parent = name if name.startswith("evaluators/") else f"evaluators/{name}"
            revision = await client.create_evaluator_revision(parent, response.normalized_json)
            return revision.name
        finally:
            await client.close()

    try:
        console.print(f"pushed [bold]{asyncio.run(create())}[/]")
    except grpc.RpcError as err:
        raise _fail(err) from err


def _samples(path: Path) -> list[rs.Sample]:
    samples = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            row = json.loads(line)
            row.setdefault("sample_id", str(i))
            if isinstance(row.get("prompt"), str):
                row["prompt"] = {"text": row["prompt"]}
            samples.append(json_format.ParseDict(row, rs.Sample(), ignore_unknown_fields=False))
    return samples


def score(
    evaluator: Annotated[str, typer.Option(help="evaluators/{e}/revisions/{r}, or a JSON file")],
    input: Annotated[Path, typer.Option(help="JSONL: sample_id, prompt, completion, metadata")],
    address: AddressOpt = None,
) -> None:
    """Score samples from a JSONL file; prints rewards and the per-scorer breakdown."""
    request = rs.ScoreRequest()
    if Path(evaluator).is_file():
        json_format.Parse(Path(evaluator).read_text(), request.spec)
    else:
        request.evaluator = (
            evaluator if "/" in evaluator else f"evaluators/{evaluator}/revisions/latest"
        )
    samples = _samples(input)
    stub, channel = _reward_stub(address)
    results: list[rs.SampleResult] = []
    with channel:
        for start in range(0, len(samples), BATCH):
            request.ClearField("samples")
            request.samples.extend(samples[start : start + BATCH])
            try:
                response = stub.Score(request, metadata=call_metadata(), timeout=600)
            except grpc.RpcError as err:
                raise _fail(err) from err
            results.extend(response.results)
    console.print(_table(results))


def _table(results: list[rs.SampleResult]) -> Table:
    names = [s.scorer for s in results[0].scorers] if results else []
    table = Table("sample", "status", "reward", *names, "gate / reason")
    for r in results:
        reward = f"{r.reward:.4g}" if r.status == rs.OK else "-"
        cells = [
            f"{s.value:.3g}" if s.status == rs.OK else rs.ScoreStatus.Name(s.status)
            for s in r.scorers
        ]
        table.add_row(
            r.sample_id, rs.ScoreStatus.Name(r.status), reward, *cells, r.gate or r.reason
        )
    return table
