"""`tlm models|datasets|evaluators alias set|rm`, `... update` and `... delete`, and
`tlm datasets append`: changing what the registry holds, through the registry client's
collection calls. `add_commands` mounts the same commands on each collection's group (main.py).

No `from __future__ import annotations`: the commands' help texts name their collection, so
their annotations must be evaluated where the closure can see it."""

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from services.cli.errors import HandledGroup, UserError
from services.cli.registry_cmds import KINDS, AddressOpt, revision_name, run
from services.clients.registry import RegistryClient
from tlm.registry.v1 import registry_pb2 as pb

console = Console()


NOUNS = {"models": "model", "datasets": "dataset", "evaluators": "evaluator"}


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
        raise UserError(f"{ref} is a revision; give the {NOUNS[collection]}'s NAME")
    return name


async def _set_alias(
    c: RegistryClient, collection: str, name: str, alias: str, revision: str | None
) -> tuple[str, Any]:
    """(the alias's previous target, the resource after the change); `revision` None removes.

    The etag read first makes "previous" exact: a change in between is refused (ABORTED)."""
    full = f"{collection}/{name}"
    current = await c.get(collection, full)
    target = ""
    if revision is not None:  # an id or an alias ("latest", "prod"): the id it names now
        ref = revision_name(collection, f"{name}@{revision}")
        target = (await c.get_revision(collection, ref)).revision_id
    changed = await c.set_alias(collection, full, alias, target, etag=current.etag)
    return current.aliases.get(alias, ""), changed


def parse_labels(given: list[str]) -> dict[str, str]:
    """`--label k=v` flags as a dict; a flag without `=` is a UserError.

    >>> parse_labels(["team=nlp", "stage=prod=1"])
    {'team': 'nlp', 'stage': 'prod=1'}
    >>> parse_labels(["oops"])
    Traceback (most recent call last):
    ...
    services.cli.errors.UserError: --label oops: expected KEY=VALUE
    """
    labels: dict[str, str] = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--label {item}: expected KEY=VALUE")
        labels[key] = value
    return labels


async def _update(
    c: RegistryClient,
    collection: str,
    full: str,
    description: str | None,
    set_labels: Mapping[str, str],
    remove: list[str],
) -> Any:
    """UpdateX with a mask of what the flags change; labels are read first (with the etag, so
    a concurrent change is refused, ABORTED) because the service replaces them whole."""
    labels, etag = None, ""
    if set_labels or remove:
        current = await c.get(collection, full)
        unknown = [k for k in remove if k not in current.labels and k not in set_labels]
        if unknown:
            raise UserError(f"{full} has no label {', '.join(unknown)}")
        labels = {k: v for k, v in current.labels.items() if k not in remove}
        labels.update(set_labels)
        etag = current.etag
    return await c.update(collection, full, description=description, labels=labels, etag=etag)


def add_commands(app: typer.Typer, collection: str) -> None:
    """Mount `alias set|rm`, `update` and `delete` for `collection` on its group."""
    noun = NOUNS[collection]
    alias_app = typer.Typer(
        cls=HandledGroup, help=f"Point {noun} aliases at revisions.", no_args_is_help=True
    )
    app.add_typer(alias_app, name="alias")

    @alias_app.command(
        "set", help=f"Point a {noun}'s ALIAS at REVISION (an id, or an alias resolved now)."
    )
    def alias_set(
        name: Annotated[str, typer.Argument(help=f"The {noun}'s NAME.")],
        alias: Annotated[str, typer.Argument(help="The alias, e.g. prod.")],
        revision: Annotated[str, typer.Argument(help="A revision id (r3) or an alias (latest).")],
        address: AddressOpt = None,
    ) -> None:
        """Point ALIAS at REVISION (an alias such as latest is resolved to its id now)."""
        short = short_name(collection, name)
        was, now = run(address, lambda c: _set_alias(c, collection, short, alias, revision))
        moved = f" (was {was})" if was and was != now.aliases[alias] else ""
        console.print(Text(f"{now.name}@{alias} -> {now.aliases[alias]}{moved}"))

    @alias_app.command("rm", help=f"Remove a {noun}'s ALIAS; the revision it named stays.")
    def alias_rm(
        name: Annotated[str, typer.Argument(help=f"The {noun}'s NAME.")],
        alias: Annotated[str, typer.Argument(help="The alias to remove.")],
        address: AddressOpt = None,
    ) -> None:
        """Remove ALIAS; the revision it pointed at stays."""
        short = short_name(collection, name)
        was, now = run(address, lambda c: _set_alias(c, collection, short, alias, None))
        console.print(Text(f"removed {now.name}@{alias} (was {was})"))

    @app.command("delete", help=f"Delete a {noun} and all its revisions (asks unless --yes).")
    def delete(
        name: Annotated[str, typer.Argument(help=f"The {noun}'s NAME.")],
        yes: Annotated[
            bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
        ] = False,
        address: AddressOpt = None,
    ) -> None:
        """Delete it with all its revisions (asks first unless --yes)."""
        full = f"{collection}/{short_name(collection, name)}"
        if not yes:
            confirm(full)
        run(address, lambda c: c.delete(collection, full))
        console.print(Text(f"deleted {full}"))

    @app.command("update", help=f"Change a {noun}'s description or labels.")
    def update(
        name: Annotated[str, typer.Argument(help=f"The {noun}'s NAME.")],
        description: Annotated[
            str | None, typer.Option(help="The new description ('' clears it).")
        ] = None,
        label: Annotated[
            list[str] | None, typer.Option(help="Set label KEY=VALUE (repeat it).")
        ] = None,
        remove_label: Annotated[
            list[str] | None, typer.Option(help="Remove label KEY (repeat it).")
        ] = None,
        address: AddressOpt = None,
    ) -> None:
        """Change the description and labels; only what a flag names changes."""
        full = f"{collection}/{short_name(collection, name)}"
        set_labels, remove = parse_labels(label or []), remove_label or []
        if description is None and not set_labels and not remove:
            raise UserError("nothing to change: give --description, --label or --remove-label")
        both = sorted(set(set_labels) & set(remove))
        if both:
            raise UserError(f"label {', '.join(both)} is both set and removed")
        now = run(address, lambda c: _update(c, collection, full, description, set_labels, remove))
        labels = ", ".join(f"{k}={v}" for k, v in sorted(now.labels.items())) or "(none)"
        console.print(Text(f"updated {now.name}: {now.description!r}; labels {labels}"))


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
