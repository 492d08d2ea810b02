"""CLI for evaluators and scoring: `tlm evaluators init|validate|push` and `tlm score`.

Mount with `app.add_typer(evaluators_app, name="evaluators")` (or add its commands to an
existing evaluators group) and `app.command("score")(score)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.cli import errors
from services.cli.errors import HandledGroup, UserError
from services.cli.registry_cmds import revision_name, run
from services.clients.reward import RewardClient
from services.common import proto_json
from tlm.reward.v1 import reward_service_pb2 as rs

evaluators_app = typer.Typer(
    cls=HandledGroup, help="Evaluator specs: init, validate, push.", no_args_is_help=True
)
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
            {
                "name": "length",
                "weight": 0.2,
                "length": {"unit": "LENGTH_UNIT_WORDS", "max_length": 400},
            },
        ],
    },
}


@evaluators_app.command("init")
def init(
    template: Annotated[
        str, typer.Option(help="Starter evaluator: math, code or format.")
    ] = "math",
) -> None:
    """Print a starter evaluator JSON."""
    if template not in TEMPLATES:
        raise UserError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    typer.echo(json.dumps(TEMPLATES[template], indent=2))


def _validate(path: Path, address: str | None) -> rs.ValidateEvaluatorResponse:
    spec_json = path.read_text()
    return errors.call(RewardClient, address, lambda c: c.validate_evaluator(spec_json))


def _print_errors(response: rs.ValidateEvaluatorResponse) -> None:
    table = Table("path", "problem", title="evaluator errors")
    for e in response.errors:
        table.add_row(Text(e.path), Text(e.message))  # literal: messages quote patterns
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

    parent = name if name.startswith("evaluators/") else f"evaluators/{name}"
    revision = run(
        registry_address,
        lambda c: c.create_evaluator_revision(parent, response.normalized_json),
        "--registry-address",
    )
    console.print(f"pushed [bold]{revision.name}[/]")


def _samples(path: Path) -> list[rs.Sample]:
    samples = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                samples.append(_sample(json.loads(line), str(i)))
            except (ValueError, json_format.ParseError) as exc:
                raise UserError(f"{path}: line {i + 1}: {exc}") from exc
    return samples


def _sample(row: Any, default_id: str) -> rs.Sample:
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    row.setdefault("sample_id", default_id)
    if isinstance(row.get("prompt"), str):
        row["prompt"] = {"text": row["prompt"]}
    return proto_json.parse_dict(row, rs.Sample(), any_case=True)


def score(
    evaluator: Annotated[
        str, typer.Option(help="NAME\\[@REV] or evaluators/{e}/revisions/{r}, or a JSON file")
    ],
    input: Annotated[Path, typer.Option(help="JSONL: sample_id, prompt, completion, metadata")],
    address: AddressOpt = None,
) -> None:
    """Score samples from a JSONL file; prints rewards and the per-scorer breakdown."""
    request = rs.ScoreRequest()
    if evaluator.endswith(".json") or Path(evaluator).is_file():
        try:
            proto_json.parse(Path(evaluator).read_text(), request.spec, any_case=True)
        except json_format.ParseError as exc:
            raise UserError(f"{evaluator}: {exc}") from exc
    else:
        request.evaluator = revision_name("evaluators", evaluator)
    samples = _samples(input)

    async def score_all(client: RewardClient) -> list[rs.SampleResult]:
        results: list[rs.SampleResult] = []
        for start in range(0, len(samples), BATCH):
            request.ClearField("samples")
            request.samples.extend(samples[start : start + BATCH])
            results.extend((await client.score(request, timeout_s=600)).results)
        return results

    console.print(_table(errors.call(RewardClient, address, score_all)))


def _table(results: list[rs.SampleResult]) -> Table:
    names = [s.scorer for s in results[0].scorers] if results else []
    table = Table("sample", "status", "reward", *names, "gate / reason")
    for r in results:
        reward = (
            f"{r.reward:.4g}" if r.HasField("reward") or r.status == rs.SCORE_STATUS_OK else "—"
        )
        cells = [
            f"{s.value:.3g}"
            if s.status == rs.SCORE_STATUS_OK
            else proto_json.short_name(rs.ScoreStatus, s.status)
            for s in r.scorers
        ]
        status = proto_json.short_name(rs.ScoreStatus, r.status)
        table.add_row(Text(r.sample_id), status, reward, *cells, Text(r.gate or r.reason))
    return table
