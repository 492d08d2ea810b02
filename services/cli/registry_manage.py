"""`tlm models|datasets|evaluators alias set|rm` and `... delete`, and `tlm datasets append`:
changing what the registry holds. One table names each collection's RPCs; `add_commands`
mounts the same commands on each collection's group (main.py).

No `from __future__ import annotations`: the commands' help texts name their collection, so
their annotations must be evaluated where the closure can see it."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from services.cli.errors import HandledGroup, UserError
from services.cli.registry_cmds import KINDS, AddressOpt, revision_name, run
from services.registry.client import RegistryClient
from tlm.registry.v1 import registry_pb2 as pb

console = Console()


@dataclass(frozen=True)
class Collection:
    """One registry collection's RPCs (stub method names) and their request types."""

    noun: str
    get: str
    get_request: Any
    get_revision: str
    get_revision_request: Any
    set_alias: str
    set_alias_request: Any
    delete: str
    delete_request: Any


COLLECTIONS = {
    "models": Collection(
        "model",
        "GetModel",
        pb.GetModelRequest,
        "GetModelRevision",
        pb.GetModelRevisionRequest,
        "SetModelAlias",
        pb.SetModelAliasRequest,
        "DeleteModel",
        pb.DeleteModelRequest,
    ),
    "datasets": Collection(
        "dataset",
        "GetDataset",
        pb.GetDatasetRequest,
        "GetDatasetRevision",
        pb.GetDatasetRevisionRequest,
        "SetDatasetAlias",
        pb.SetDatasetAliasRequest,
        "DeleteDataset",
        pb.DeleteDatasetRequest,
    ),
    "evaluators": Collection(
        "evaluator",
        "GetEvaluator",
        pb.GetEvaluatorRequest,
        "GetEvaluatorRevision",
        pb.GetEvaluatorRevisionRequest,
        "SetEvaluatorAlias",
        pb.SetEvaluatorAliasRequest,
        "DeleteEvaluator",
        pb.DeleteEvaluatorRequest,
    ),
}


def short_name(collection: str, ref: str) -> str:
    """NAME or '{collection}/NAME' -> NAME; a revision (NAME@REV) is refused.

    >>> short_name("models", "tiny"), short_name("models", "models/tiny")
    ('tiny', 'tiny')
    >>> short_name("models", "tiny@r2")
    Traceback (most recent call last):
    ...
    services.cli.errors.UserError: tiny@r2 is a revision; give the model's NAME
    """
    name = ref.removeprefix(f"{collection}/")
    if "@" in name or "/" in name:
        raise UserError(f"{ref} is a revision; give the {COLLECTIONS[collection].noun}'s NAME")
    return name


async def _set_alias(
    c: RegistryClient, collection: str, name: str, alias: str, revision: str | None
) -> tuple[str, Any]:
    """(the alias's previous target, the resource after the change); `revision` None removes.

    The etag read first makes "previous" exact: a change in between is refused (ABORTED)."""
    coll, md = COLLECTIONS[collection], c.metadata()
    full = f"{collection}/{name}"
    current = await getattr(c.stub, coll.get)(coll.get_request(name=full), metadata=md)
    target = ""
    if revision is not None:  # an id or an alias ("latest", "prod"): the id it names now
        ref = revision_name(collection, f"{name}@{revision}")
        rev = await getattr(c.stub, coll.get_revision)(
            coll.get_revision_request(name=ref), metadata=md
        )
        target = rev.revision_id
    request = coll.set_alias_request(name=full, alias=alias, revision_id=target, etag=current.etag)
    changed = await getattr(c.stub, coll.set_alias)(request, metadata=md)
    return current.aliases.get(alias, ""), changed


def add_commands(app: typer.Typer, collection: str) -> None:
    """Mount `alias set|rm` and `delete` for `collection` on its group."""
    coll = COLLECTIONS[collection]
    alias_app = typer.Typer(
        cls=HandledGroup, help=f"Point {coll.noun} aliases at revisions.", no_args_is_help=True
    )
    app.add_typer(alias_app, name="alias")

    @alias_app.command(
        "set", help=f"Point a {coll.noun}'s ALIAS at REVISION (an id, or an alias resolved now)."
    )
    def alias_set(
        name: Annotated[str, typer.Argument(help=f"The {coll.noun}'s NAME.")],
        alias: Annotated[str, typer.Argument(help="The alias, e.g. prod.")],
        revision: Annotated[str, typer.Argument(help="A revision id (r3) or an alias (latest).")],
        address: AddressOpt = None,
    ) -> None:
        """Point ALIAS at REVISION (an alias such as latest is resolved to its id now)."""
        short = short_name(collection, name)
        was, now = run(address, lambda c: _set_alias(c, collection, short, alias, revision))
        moved = f" (was {was})" if was and was != now.aliases[alias] else ""
        console.print(Text(f"{now.name}@{alias} -> {now.aliases[alias]}{moved}"))

    @alias_app.command("rm", help=f"Remove a {coll.noun}'s ALIAS; the revision it named stays.")
    def alias_rm(
        name: Annotated[str, typer.Argument(help=f"The {coll.noun}'s NAME.")],
        alias: Annotated[str, typer.Argument(help="The alias to remove.")],
        address: AddressOpt = None,
    ) -> None:
        """Remove ALIAS; the revision it pointed at stays."""
        short = short_name(collection, name)
        was, now = run(address, lambda c: _set_alias(c, collection, short, alias, None))
        console.print(Text(f"removed {now.name}@{alias} (was {was})"))

    @app.command("delete", help=f"Delete a {coll.noun} and all its revisions (asks unless --yes).")
    def delete(
        name: Annotated[str, typer.Argument(help=f"The {coll.noun}'s NAME.")],
        yes: Annotated[
            bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
        ] = False,
        address: AddressOpt = None,
    ) -> None:
        """Delete it with all its revisions (asks first unless --yes)."""
        full = f"{collection}/{short_name(collection, name)}"
        if not yes:
            confirm(full)
        request = coll.delete_request(name=full)
        run(address, lambda c: getattr(c.stub, coll.delete)(request, metadata=c.metadata()))
        console.print(Text(f"deleted {full}"))


def interactive() -> bool:
    """Whether a person can answer a prompt (stdin is a terminal)."""
    return sys.stdin.isatty()


def confirm(name: str) -> None:
    """Ask before deleting `name`; without a terminal to ask on, --yes is required."""
    if not interactive():
        raise UserError(f"not deleting {name}: pass --yes to delete without a terminal to confirm")
    typer.confirm(f"Delete {name} and all its revisions?", abort=True)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a bad line is a UserError naming file and line."""
    if path.suffix == ".parquet":
        raise UserError(f"{path}: append reads JSONL; push Parquet with `tlm datasets push`")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text") from exc
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}: line {i + 1}: {exc}") from exc
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {i + 1}: expected a JSON object")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows to append")
    return rows


def datasets_append(
    name: Annotated[str, typer.Argument(help="The dataset's NAME.")],
    file: Annotated[Path, typer.Argument(help="JSONL, one row per line.")],
    kind: Annotated[
        str | None, typer.Option(help=f"{' | '.join(KINDS)}; needed only for a new dataset.")
    ] = None,
    request_id: Annotated[str, typer.Option(help="Idempotency key for retries.")] = "",
    address: AddressOpt = None,
) -> None:
    """Append FILE's rows as a new revision (the previous revision's rows, then these)."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    parent = f"datasets/{short_name('datasets', name)}"
    rows = read_rows(file)
    kind_value = KINDS[kind] if kind else pb.DATASET_KIND_UNSPECIFIED
    rev = run(address, lambda c: c.append_dataset_rows(parent, kind_value, rows, request_id))
    console.print(
        Text(
            f"appended {len(rows)} rows: {rev.name}, {rev.row_count} rows, sha256 {rev.sha256[:12]}"
        )
    )
