"""`tlm reviews list|answer`, `tlm engine status` and `tlm jobs estimate` against a running
embedded server: what each prints, and its one-line refusal."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from typer.testing import CliRunner, Result

from services.cli.main import app
from services.devtools.server_thread import ServerThread

CLOSED = "127.0.0.1:1"  # nothing listens on port 1


def tlm(server: ServerThread | str, *args: str) -> Result:
    address = server if isinstance(server, str) else server.address
    # Wide enough that table cells do not wrap the names and texts asserted on.
    return CliRunner().invoke(app, [*args, "--address", address], env={"COLUMNS": "200"})


def one_line(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = result.stderr.splitlines()
    return line


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def pending_reviews(server: ServerThread, tmp: Path, kind: str, rows: list[dict]) -> list[str]:
    """Score `rows` with a human scorer of `kind`; the review names listed for them."""
    spec, samples = tmp / f"{kind}.json", tmp / f"{kind}.jsonl"
    dataset = f"cli-prefs-{uuid.uuid4().hex[:8]}"
    human = {"kind": kind, "dataset": dataset, "rating_min": 0, "rating_max": 10}
    spec.write_text(json.dumps({"scorers": [{"name": "people", "human": human}]}))
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok(tlm(server, "score", "--evaluator", str(spec), "--input", str(samples)))
    listed = ok(tlm(server, "reviews", "list"))
    marker = rows[0]["prompt"]
    # Each review is a table row; the name cell never wraps, the prompt may.
    blocks = listed.split("├")
    ids = [re.search(r"│ (\w+) ", b)[1] for b in blocks if marker in b]  # type: ignore[index]
    return [f"reviews/{review_id}" for review_id in ids]


def test_rating_review_listed_answered_and_written(embedded: ServerThread, tmp_path: Path) -> None:
    prompt = f"Rate{uuid.uuid4().hex[:4]}"
    row = {"sample_id": "s1", "prompt": prompt, "completion": "an answer"}
    (name,) = pending_reviews(embedded, tmp_path, "RATING", [row])
    listed = ok(tlm(embedded, "reviews", "list"))
    assert "rating 0..10" in listed and "an answer" in listed

    wrong = tlm(embedded, "reviews", "answer", name, "--rating", "4", "--choice", "A")
    assert one_line(wrong, 2) == (
        "error: give exactly one of --rating (rating reviews) or --choice (pairwise)"
    )
    out = ok(tlm(embedded, "reviews", "answer", name, "--rating", "7", "--reviewer", "ann"))
    # One rating has nothing to be compared with yet: no preference row is written.
    assert out == f"{name} ANSWERED: rated 7 of 0..10 by ann\n"
    review_id = name.removeprefix("reviews/")
    assert review_id not in ok(tlm(embedded, "reviews", "list"))  # pending only, by default
    assert review_id in ok(tlm(embedded, "reviews", "list", "--state", "answered"))


def test_pairwise_review_answered_by_letter(embedded: ServerThread, tmp_path: Path) -> None:
    prompt = f"Pick{uuid.uuid4().hex[:4]}"
    rows = [
        {"sample_id": "a", "prompt": prompt, "completion": "one", "group_id": "g"},
        {"sample_id": "b", "prompt": prompt, "completion": "two", "group_id": "g"},
    ]
    (name,) = pending_reviews(embedded, tmp_path, "PAIRWISE", rows)
    assert one_line(tlm(embedded, "reviews", "answer", name, "--choice", "C"), 2) == (
        "error: --choice: 'C' is not A or B"
    )
    out = ok(tlm(embedded, "reviews", "answer", name.removeprefix("reviews/"), "--choice", "b"))
    assert out.startswith(f"{name} ANSWERED: chose B; written to datasets/")
    again = tlm(embedded, "reviews", "answer", name, "--choice", "A")
    assert again.exit_code == 2 and name in again.stderr.splitlines()[0]
    assert one_line(tlm(embedded, "reviews", "answer", "nope", "--choice", "A"), 2) == (
        "error: NOT_FOUND: reviews/nope not found"
    )
    assert one_line(tlm(embedded, "reviews", "list", "--state", "open"), 2) == (
        "error: unknown state 'open'; expected one of pending, answered, all"
    )


def test_engine_status(embedded: ServerThread) -> None:
    out = ok(tlm(embedded, "engine", "status"))
    assert "rollout engine" in out and "transformers on cpu" in out
    assert re.search(r"queue\s+│ \d+ waiting of \d+, \d+ running", out), out
    assert "tokens/s" in out
    assert one_line(tlm(CLOSED, "engine", "status"), 2) == (
        f"error: cannot reach the rollout service at {CLOSED} (connection refused); "
        "start the services with `tlm up`, or pass --address HOST:PORT"
    )


def test_jobs_estimate_takes_create_flags(
    embedded: ServerThread, tmp_path: Path, tiny_model_dir: Path
) -> None:
    model, data = f"cli-est-{uuid.uuid4().hex[:6]}", f"cli-est-{uuid.uuid4().hex[:6]}"
    ok(tlm(embedded, "models", "push", model, str(tiny_model_dir)))
    rows = tmp_path / "sft.jsonl"
    rows.write_text('{"prompt": "p", "completion": "c"}\n')
    ok(tlm(embedded, "datasets", "push", data, str(rows), "--kind", "sft"))
    shown = json.loads(ok(tlm(embedded, "models", "show", model)))
    params = int(shown["metadata"]["parameter_count"])

    flags = ("--method", "sft", "--base-model", f"{model}@r1", "--dataset", data)
    out = ok(tlm(embedded, "jobs", "estimate", *flags, "--full"))
    assert f"{params:,}" in out and "memory per device" in out
    assert re.search(rf"trainable\s+│ {params:,}", out), out  # --full: every parameter trains
    lora = ok(tlm(embedded, "jobs", "estimate", *flags, "--lora", "--lora-r", "2"))
    assert not re.search(rf"trainable\s+│ {params:,}", lora), lora  # the flag changed the spec

    assert one_line(tlm(embedded, "jobs", "estimate", "--base-model", model), 2) == (
        "error: --method is needed (or `method` in the spec file)"
    )
    missing = tlm(
        embedded, "jobs", "estimate", "--method", "sft", "--base-model", "nope", "--dataset", data
    )
    assert missing.exit_code == 2 and missing.stdout == ""
    assert missing.stderr.splitlines()[0] == (
        "error: NOT_FOUND: spec.base_model: models/nope/revisions/latest: models/nope not found"
    )
    help_text = CliRunner().invoke(app, ["jobs", "estimate", "--help"], terminal_width=200)
    assert "--validate-only" not in help_text.stdout and "--lora-r" in help_text.stdout
