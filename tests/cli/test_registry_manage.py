"""`tlm models|datasets|evaluators alias set|rm`, `... update` and `... delete`, and
`tlm datasets append`, against a running embedded server: what each prints, and its one-line
refusal (exit 2, the service's status and message)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from services.cli import registry_manage
from services.cli.main import app
from services.devtools.server_thread import ServerThread


def tlm(server: ServerThread, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, [*args, "--address", server.address], input=input)


def one_line(result: Result, code: int) -> str:
    """The single stderr line of a failed command (after asserting exit code and no output)."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = result.stderr.splitlines()
    return line


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def two_datasets_revisions(server: ServerThread, name: str, tmp: Path) -> None:
    rows = tmp / "rows.jsonl"
    rows.write_text('{"prompt": "p", "completion": "c"}\n')
    for _ in range(2):
        ok(tlm(server, "datasets", "push", name, str(rows), "--kind", "sft"))


def two_evaluator_revisions(server: ServerThread, name: str, tmp: Path) -> None:
    for n in (5, 9):  # two different specs: two revisions
        spec = tmp / f"spec{n}.json"
        spec.write_text(json.dumps({"scorers": [{"name": "n", "length": {"max_length": n}}]}))
        args = ("evaluators", "push", name, str(spec), "--registry-address", server.address)
        ok(tlm(server, *args))


def two_model_revisions(server: ServerThread, name: str, tmp: Path, model: Path) -> None:
    for description in ("one", "two"):
        ok(tlm(server, "models", "push", name, str(model), "--description", description))


MAKERS: dict[str, Callable[..., None]] = {
    "datasets": two_datasets_revisions,
    "evaluators": two_evaluator_revisions,
    "models": two_model_revisions,
}


@pytest.mark.parametrize("collection", list(MAKERS))
def test_alias_set_move_rm_and_delete(
    collection: str, embedded: ServerThread, tmp_path: Path, tiny_model_dir: Path
) -> None:
    name = unique("cli-manage")
    extra = (tiny_model_dir,) if collection == "models" else ()
    MAKERS[collection](embedded, name, tmp_path, *extra)
    full = f"{collection}/{name}"

    assert ok(tlm(embedded, collection, "alias", "set", name, "prod", "r1")) == (
        f"{full}@prod -> r1\n"
    )
    # An alias as the target is resolved to the id it names now; the old target is shown.
    assert ok(tlm(embedded, collection, "alias", "set", name, "prod", "latest")) == (
        f"{full}@prod -> r2 (was r1)\n"
    )
    assert one_line(tlm(embedded, collection, "alias", "set", name, "prod", "r9"), 2) == (
        f"error: NOT_FOUND: {full}/revisions/r9 not found"
    )
    assert ok(tlm(embedded, collection, "alias", "rm", full, "prod")) == (
        f"removed {full}@prod (was r2)\n"
    )
    assert one_line(tlm(embedded, collection, "alias", "rm", name, "prod"), 2) == (
        f"error: NOT_FOUND: alias 'prod' of {full} not found"
    )

    noun = collection[:-1]
    assert one_line(tlm(embedded, collection, "delete", f"{name}@r1", "--yes"), 2) == (
        f"error: {name}@r1 is a revision; give the {noun}'s NAME"
    )
    # CliRunner's stdin is no terminal: without --yes nothing is deleted.
    assert one_line(tlm(embedded, collection, "delete", name), 2) == (
        f"error: not deleting {full}: pass --yes to delete without a terminal to confirm"
    )
    assert ok(tlm(embedded, collection, "delete", name, "--yes")) == f"deleted {full}\n"
    assert one_line(tlm(embedded, collection, "delete", name, "--yes"), 2) == (
        f"error: NOT_FOUND: {full} not found"
    )


@pytest.mark.parametrize("collection", list(MAKERS))
def test_update_changes_only_what_the_flags_name(
    collection: str, embedded: ServerThread, tmp_path: Path, tiny_model_dir: Path
) -> None:
    name = unique("cli-update")
    extra = (tiny_model_dir,) if collection == "models" else ()
    MAKERS[collection](embedded, name, tmp_path, *extra)
    full = f"{collection}/{name}"

    out = ok(tlm(embedded, collection, "update", name, "--label", "team=nlp", "--label", "t=1"))
    assert out == f"updated {full}: ''; labels t=1, team=nlp\n"
    out = ok(tlm(embedded, collection, "update", full, "--description", "for [evals]"))
    assert out == f"updated {full}: 'for [evals]'; labels t=1, team=nlp\n"  # labels kept
    out = ok(tlm(embedded, collection, "update", name, "--remove-label", "t", "--label", "a=b"))
    assert out == f"updated {full}: 'for [evals]'; labels a=b, team=nlp\n"

    assert one_line(tlm(embedded, collection, "update", name), 2) == (
        "error: nothing to change: give --description, --label or --remove-label"
    )
    assert one_line(tlm(embedded, collection, "update", name, "--label", "oops"), 2) == (
        "error: --label oops: expected KEY=VALUE"
    )
    assert one_line(tlm(embedded, collection, "update", name, "--remove-label", "zz"), 2) == (
        f"error: {full} has no label zz"
    )
    assert one_line(tlm(embedded, collection, "update", f"{name}-x", "--label", "a=b"), 2) == (
        f"error: NOT_FOUND: {full}-x not found"
    )


def test_delete_asks_on_a_terminal(
    embedded: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("cli-ask")
    two_datasets_revisions(embedded, name, tmp_path)
    monkeypatch.setattr(registry_manage, "interactive", lambda: True)
    declined = tlm(embedded, "datasets", "delete", name, input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert ok(tlm(embedded, "datasets", "alias", "set", name, "kept", "r1"))  # still there
    accepted = tlm(embedded, "datasets", "delete", name, input="y\n")
    assert f"Delete datasets/{name} and all its revisions?" in ok(accepted)
    assert accepted.stdout.endswith(f"deleted datasets/{name}\n")


def test_datasets_append(embedded: ServerThread, tmp_path: Path) -> None:
    name = unique("cli-append")
    rows = tmp_path / "more.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    out = ok(tlm(embedded, "datasets", "append", name, str(rows), "--kind", "sft"))
    assert out.startswith(f"appended 2 rows: datasets/{name}/revisions/r1, 2 rows, sha256 ")
    out = ok(tlm(embedded, "datasets", "append", name, str(rows)))  # kind: the dataset's
    assert out.startswith(f"appended 2 rows: datasets/{name}/revisions/r2, 4 rows, sha256 ")
    head = ok(tlm(embedded, "datasets", "head", f"{name}@r2", "-n", "9")).splitlines()
    assert [json.loads(line)["prompt"] for line in head] == ["a", "c", "a", "c"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n["not", "an", "object"]\n')
    assert one_line(tlm(embedded, "datasets", "append", name, str(bad)), 2) == (
        f"error: {bad}: line 2: expected a JSON object"
    )
    missing = tmp_path / "missing.jsonl"
    assert one_line(tlm(embedded, "datasets", "append", name, str(missing)), 2) == (
        f"error: {missing}: No such file or directory"
    )
