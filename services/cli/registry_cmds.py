"""`tlm models ...`, `tlm datasets ...` and `tlm evaluators list|show`: the registry from the
shell. Each command is one or two calls of the registry client (services/clients/registry.py)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from services.cli import errors
from services.cli.errors import HandledGroup, UserError
from services.clients.registry import RegistryClient
from services.common import proto_json
from tlm.registry.v1 import registry_pb2 as pb

T = TypeVar("T")
console = Console()
models_app = typer.Typer(cls=HandledGroup, help="Models and their revisions.", no_args_is_help=True)
datasets_app = typer.Typer(
    cls=HandledGroup, help="Datasets and their revisions.", no_args_is_help=True
)
PAGE_SIZE = 1000  # per List call; the list commands follow next_page_token to the end
AddressOpt = Annotated[str | None, typer.Option(help="Registry address.")]
KINDS = {
    "sft": pb.DATASET_KIND_SFT,
    "preference": pb.DATASET_KIND_PREFERENCE,
    "unpaired_preference": pb.DATASET_KIND_UNPAIRED_PREFERENCE,
    "prompt": pb.DATASET_KIND_PROMPT,
}


def revision_name(collection: str, ref: str) -> str:
    """NAME[@REV] -> '{collection}/NAME/revisions/REV' (REV defaults to 'latest'); a full
    name passes through.

    >>> revision_name("evaluators", "grader@prod"), revision_name("models", "models/tiny")
    ('evaluators/grader/revisions/prod', 'models/tiny/revisions/latest')
    """
    if ref.startswith(f"{collection}/"):
        return ref if "/revisions/" in ref else f"{ref}/revisions/latest"
    name, _, rev = ref.partition("@")
    return f"{collection}/{name}/revisions/{rev or 'latest'}"


def run(
    address: str | None,
    call: Callable[[RegistryClient], Awaitable[T]],
    option: str = "--address",
) -> T:
    """Run one client call on the registry; its errors are reported by services/cli/errors.py."""
    return errors.call(RegistryClient, address, call, option)


def list_all(address: str | None, collection: str, prefix: str) -> Sequence[Any]:
    """Every resource of `collection` whose name starts with `prefix`, page after page."""
    return run(
        address, lambda c: c.list_resources(collection, page_size=PAGE_SIZE, name_prefix=prefix)
    )


def show_json(message: Any) -> None:
    console.print_json(json_format.MessageToJson(message, preserving_proto_field_name=True))


@models_app.command("push")
def models_push(
    name: str,
    folder: Path,
    adapter_of: Annotated[
        str | None, typer.Option(help="Base MODEL@REV of a LoRA adapter.")
    ] = None,
    description: str = "",
    request_id: Annotated[str, typer.Option(help="Idempotency key for retries.")] = "",
    address: AddressOpt = None,
) -> None:
    """Upload a Hugging Face folder (or a LoRA adapter folder) as a new revision."""
    lineage = pb.Lineage(
        base_model_revision=revision_name("models", adapter_of) if adapter_of else ""
    )
    fmt = pb.MODEL_FORMAT_LORA_ADAPTER if adapter_of else pb.MODEL_FORMAT_FULL_WEIGHTS
    rev = run(
        address,
        lambda c: c.upload_model_revision(
            f"models/{name}",
            folder,
            format=fmt,
            lineage=lineage,
            request_id=request_id,
            description=description,
        ),
    )
    console.print(
        f"pushed [bold]{rev.name}[/] ({rev.manifest.total_bytes} bytes, "
        f"{rev.metadata.parameter_count} parameters)"
    )


@models_app.command("list")
def models_list(prefix: str = "", address: AddressOpt = None) -> None:
    """List models."""
    models = list_all(address, "models", prefix)
    table = Table("name", "latest", "aliases", "updated")
    for m in models:
        table.add_row(
            m.name,
            m.latest_revision_id,
            json.dumps(dict(m.aliases)),
            m.update_time.ToDatetime().isoformat(timespec="seconds"),
        )
    console.print(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME\\[@REV]")], address: AddressOpt = None
) -> None:
    """Show a model revision as JSON."""
    show_json(run(address, lambda c: c.get_model_revision(revision_name("models", ref))))


@datasets_app.command("push")
def datasets_push(
    name: str,
    file: Path,
    kind: Annotated[str, typer.Option(help=" | ".join(KINDS))],
    description: str = "",
    request_id: str = "",
    address: AddressOpt = None,
) -> None:
    """Upload a JSONL or Parquet file as a new revision, validated row by row."""
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    fmt = pb.DATASET_FORMAT_PARQUET if file.suffix == ".parquet" else pb.DATASET_FORMAT_JSONL
    rev = run(
        address,
        lambda c: c.upload_dataset_file(
            f"datasets/{name}",
            file,
            KINDS[kind],
            format=fmt,
            request_id=request_id,
            description=description,
        ),
    )
    console.print(f"pushed [bold]{rev.name}[/]: {rev.row_count} rows, sha256 {rev.sha256[:12]}")


@datasets_app.command("list")
def datasets_list(prefix: str = "", address: AddressOpt = None) -> None:
    """List datasets."""
    datasets = list_all(address, "datasets", prefix)
    table = Table("name", "kind", "latest", "aliases")
    for d in datasets:
        table.add_row(
            d.name,
            proto_json.short_name(pb.DatasetKind, d.kind).lower(),
            d.latest_revision_id,
            json.dumps(dict(d.aliases)),
        )
    console.print(table)


@datasets_app.command("show")
def datasets_show(
    ref: Annotated[str, typer.Argument(help="NAME\\[@REV]")], address: AddressOpt = None
) -> None:
    """Show a dataset revision (rows, schema, length statistics) as JSON."""
    show_json(run(address, lambda c: c.get_dataset_revision(revision_name("datasets", ref))))


@datasets_app.command("head")
def datasets_head(
    ref: Annotated[str, typer.Argument(help="NAME\\[@REV]")],
    n: Annotated[int, typer.Option("-n", help="Rows to print.")] = 5,
    address: AddressOpt = None,
) -> None:
    """Print the first rows as JSON lines."""

    async def rows(c: RegistryClient) -> list[dict[str, Any]]:
        return [r async for r in c.read_dataset_rows(revision_name("datasets", ref), limit=n)]

    for row in run(address, rows):
        typer.echo(json.dumps(row, ensure_ascii=False))


def evaluators_list(prefix: str = "", address: AddressOpt = None) -> None:
    """List evaluators."""
    evaluators = list_all(address, "evaluators", prefix)
    table = Table("name", "latest", "aliases")
    for e in evaluators:
        table.add_row(e.name, e.latest_revision_id, json.dumps(dict(e.aliases)))
    console.print(table)


def evaluators_show(
    ref: Annotated[str, typer.Argument(help="NAME\\[@REV]")], address: AddressOpt = None
) -> None:
    """Print an evaluator revision's spec JSON."""
    rev = run(address, lambda c: c.get_evaluator_revision(revision_name("evaluators", ref)))
    typer.echo(rev.spec_json)
