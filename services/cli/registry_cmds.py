"""`tlm models ...`, `tlm datasets ...` and `tlm evaluators list|show`: the registry from the
shell. Each command is one or two RPCs through services.registry.client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from services.common.client import resolve_address
from services.registry.client import RegistryClient
from tlm.registry.v1 import registry_pb2 as pb

T = TypeVar("T")
console = Console()
err = Console(stderr=True)
models_app = typer.Typer(help="Models and their revisions.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets and their revisions.", no_args_is_help=True)
AddressOpt = Annotated[str | None, typer.Option(help="Registry address.")]
KINDS = {
    "sft": pb.SFT,
    "preference": pb.PREFERENCE,
    "unpaired_preference": pb.UNPAIRED_PREFERENCE,
    "prompt": pb.PROMPT,
}


def revision_name(collection: str, ref: str) -> str:
    """NAME[@REV] -> '{collection}/NAME/revisions/REV' (REV defaults to 'latest')."""
    if ref.startswith(f"{collection}/"):
        return ref if "/revisions/" in ref else f"{ref}/revisions/latest"
    name, _, rev = ref.partition("@")
    return f"{collection}/{name}/revisions/{rev or 'latest'}"


def run(address: str | None, call: Callable[[RegistryClient], Awaitable[T]]) -> T:
    """Run one client call; print gRPC errors with their field violations and exit 1."""

    async def main() -> T:
        client = RegistryClient(resolve_address("registry", address))
        try:
            return await call(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except grpc.aio.AioRpcError as exc:
        print_rpc_error(exc)
        raise typer.Exit(1) from exc


def print_rpc_error(exc: grpc.aio.AioRpcError) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    err.print(f"[red]{exc.code().name}[/]: {exc.details()}")
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                err.print(f"  {v.field}: {v.description}")


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
    fmt = pb.LORA_ADAPTER if adapter_of else pb.FULL_WEIGHTS
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
    response = run(
        address,
        lambda c: c.stub.ListModels(
            pb.ListModelsRequest(name_prefix=prefix, page_size=1000), metadata=c.metadata()
        ),
    )
    table = Table("name", "latest", "aliases", "updated")
    for m in response.models:
        table.add_row(
            m.name,
            m.latest_revision_id,
            json.dumps(dict(m.aliases)),
            m.update_time.ToDatetime().isoformat(timespec="seconds"),
        )
    console.print(table)


@models_app.command("show")
def models_show(
    ref: Annotated[str, typer.Argument(help="NAME[@REV]")], address: AddressOpt = None
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
        err.print(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        raise typer.Exit(2)
    fmt = pb.PARQUET if file.suffix == ".parquet" else pb.JSONL
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
    response = run(
        address,
        lambda c: c.stub.ListDatasets(
            pb.ListDatasetsRequest(name_prefix=prefix, page_size=1000), metadata=c.metadata()
        ),
    )
    table = Table("name", "kind", "latest", "aliases")
    for d in response.datasets:
        table.add_row(
            d.name,
            pb.DatasetKind.Name(d.kind).lower(),
            d.latest_revision_id,
            json.dumps(dict(d.aliases)),
        )
    console.print(table)


@datasets_app.command("show")
def datasets_show(
    ref: Annotated[str, typer.Argument(help="NAME[@REV]")], address: AddressOpt = None
) -> None:
    """Show a dataset revision (rows, schema, length statistics) as JSON."""
    show_json(
        run(
            address,
            lambda c: c.stub.GetDatasetRevision(
                pb.GetDatasetRevisionRequest(name=revision_name("datasets", ref)),
                metadata=c.metadata(),
            ),
        )
    )


@datasets_app.command("head")
def datasets_head(
    ref: Annotated[str, typer.Argument(help="NAME[@REV]")],
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
    response = run(
        address,
        lambda c: c.stub.ListEvaluators(
            pb.ListEvaluatorsRequest(name_prefix=prefix, page_size=1000), metadata=c.metadata()
        ),
    )
    table = Table("name", "latest", "aliases")
    for e in response.evaluators:
        table.add_row(e.name, e.latest_revision_id, json.dumps(dict(e.aliases)))
    console.print(table)


def evaluators_show(
    ref: Annotated[str, typer.Argument(help="NAME[@REV]")], address: AddressOpt = None
) -> None:
    """Print an evaluator revision's spec JSON."""
    rev = run(address, lambda c: c.get_evaluator_revision(revision_name("evaluators", ref)))
    typer.echo(rev.spec_json)
