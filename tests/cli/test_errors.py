"""Every CLI user error is one red line on stderr, exit code 2, no traceback; a service's refusal
is its status and message, literally, exit code 2 too; `--debug` shows the traceback instead."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from services.cli import main, registry_cmds
from services.cli.main import app
from services.cli.reward_cmds import TEMPLATES
from services.common.client import SERVICES
from services.common.ids import ID_RULE
from services.devtools.server_thread import ServerThread
from tests.tlm_process import TLM

CLOSED = "127.0.0.1:1"  # nothing listens on port 1
UNKNOWN_HOST = "no-such-host.invalid:50051"  # .invalid never resolves (RFC 6761)
HINT = "start the services with `tlm up`, or pass --address HOST:PORT"


def tlm(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def one_line(result: Result, code: int) -> str:
    """The single stderr line of a failed command (after asserting exit code and no output)."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = result.stderr.splitlines()
    return line


@pytest.fixture
def missing(tmp_path: Path) -> Path:
    return tmp_path / "missing.json"


@pytest.fixture
def one_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens: the message after one attempt is the one after the default policy's
    retries (tests/clients/test_retries.py), which take 1.5 s to fail a closed port."""
    monkeypatch.setenv("TLM_CLIENT_MAX_ATTEMPTS", "1")


def test_missing_input_files_name_the_file(missing: Path) -> None:
    cases = [
        ("evaluators", "validate", str(missing), "--address", CLOSED),
        ("evaluators", "push", "e", str(missing), "--address", CLOSED),
        ("score", "--evaluator", "grader@latest", "--input", str(missing), "--address", CLOSED),
        ("score", "--evaluator", str(missing), "--input", str(missing), "--address", CLOSED),
        ("datasets", "push", "d", str(missing), "--kind", "sft", "--address", CLOSED),
    ]
    for args in cases:
        line = one_line(tlm(*args), 2)
        assert line == f"error: {missing}: No such file or directory", args


def test_models_push_blames_the_folder_not_the_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "missing"
    line = one_line(tlm("models", "push", "x", str(folder), "--address", CLOSED), 2)
    assert line == f"error: {folder}: No such file or directory"
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    line = one_line(tlm("models", "push", "x", str(a_file), "--address", CLOSED), 2)
    assert line == f"error: {a_file}: Not a directory"


def test_bad_input_rows_name_file_and_line(tmp_path: Path) -> None:
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"completion": "a"}\nnot json\n')
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TEMPLATES["math"]))
    result = tlm("score", "--evaluator", str(spec), "--input", str(rows), "--address", CLOSED)
    assert one_line(result, 2) == (
        f"error: {rows}: line 2: Expecting value: line 1 column 1 (char 0)"
    )


@pytest.mark.parametrize(
    ("args", "service"),
    [
        (("models", "list"), "registry"),
        (("datasets", "show", "d@prod"), "registry"),
        (("evaluators", "validate", "SPEC"), "reward"),
        (("score", "--evaluator", "grader@latest", "--input", "ROWS"), "reward"),
        (("generate", "--model", "tiny", "--prompt", "hi"), "rollout"),
        (("jobs", "list"), "trainer"),
    ],
)
def test_unreachable_services_name_the_address_and_suggest_tlm_up(
    args: tuple[str, ...], service: str, tmp_path: Path, one_attempt: None
) -> None:
    spec, rows = tmp_path / "spec.json", tmp_path / "rows.jsonl"
    spec.write_text(json.dumps(TEMPLATES["math"]))
    rows.write_text('{"completion": "a"}\n')
    args = tuple({"SPEC": str(spec), "ROWS": str(rows)}.get(a, a) for a in args)
    for address, reason in [(CLOSED, "connection refused"), (UNKNOWN_HOST, "unknown host")]:
        line = one_line(tlm(*args, "--address", address), 2)
        assert line == f"error: cannot reach the {service} service at {address} ({reason}); {HINT}"


def test_health_fails_fast_on_a_closed_port() -> None:
    started = time.monotonic()
    result = tlm("health", "--address", CLOSED, "--json")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1 and elapsed < 3, elapsed  # was 5 s per service (wait_for_ready)
    assert {r["status"] for r in json.loads(result.stdout).values()} == {"UNAVAILABLE"}
    *first, last = SERVICES  # registry, reward, rollout, trainer, ...
    assert result.stderr.splitlines() == [
        f"error: cannot reach the {', '.join(first)} and {last} services at {CLOSED}; {HINT}"
    ]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.slow  # starts `tlm up`, which fails to bind: seconds
def test_up_on_a_busy_port(busy_port: int, tmp_path: Path) -> None:
    env = {**os.environ, "TLM_LOG_JSON": "true"}
    args = ["up", "--host", "127.0.0.1", "--port", str(busy_port), "--data-dir", str(tmp_path)]
    proc = subprocess.run([*TLM, *args], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # The last line is ours; before it come the server's JSON log and gRPC core's own line.
    assert proc.stderr.splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{busy_port}: the port is in use, or the host is not "
        "an address of this machine; pick another with --port (0: any free port)"
    )


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    args = ["models", "push", "x", str(tmp_path / "missing"), "--address", CLOSED]
    for result in (tlm("--debug", *args), CliRunner().invoke(app, args, env={"TLM_DEBUG": "1"})):
        assert isinstance(result.exception, FileNotFoundError)
        assert "error:" not in result.stderr
    proc = subprocess.run([*TLM, "--debug", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "FileNotFoundError" in proc.stderr
    assert "folder_manifest" in proc.stderr  # the frame that raised it


def test_an_unexpected_error_is_one_line_pointing_at_debug(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(*_: object) -> dict[str, str]:
        raise RuntimeError("boom [x]")

    monkeypatch.setattr(main, "check_health", boom)
    line = one_line(tlm("health", "--address", CLOSED), 1)
    assert line == "error: internal error: RuntimeError: boom [x]; rerun with --debug"


def test_server_messages_are_printed_literally(embedded: ServerThread) -> None:
    """The registry's message quotes `[a-z0-9._-]`, which Rich markup would swallow."""
    result = tlm("models", "show", "Bad_Name@latest", "--address", embedded.address)
    problem = f"'Bad_Name' is not valid: expected {ID_RULE}"
    assert "[a-z0-9._-]" in ID_RULE and result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: INVALID_ARGUMENT: name: {problem}",
        f"  name: {problem}",  # the BadRequest field violation
    ]


def test_score_accepts_name_at_alias(embedded: ServerThread, tmp_path: Path) -> None:
    spec, rows = tmp_path / "spec.json", tmp_path / "rows.jsonl"
    spec.write_text(json.dumps({"scorers": [{"name": "n", "length": {"max_length": 9}}]}))
    rows.write_text(json.dumps({"sample_id": "s1", "completion": "short"}) + "\n")
    address = ("--address", embedded.address)
    registry = ("--registry-address", embedded.address)
    pushed = tlm("evaluators", "push", "cli-alias", str(spec), *address, *registry)
    assert pushed.exit_code == 0, pushed.output
    for ref in ("cli-alias@latest", "cli-alias@r1", "cli-alias", "evaluators/cli-alias"):
        result = tlm("score", "--evaluator", ref, "--input", str(rows), *address)
        assert result.exit_code == 0 and "s1" in result.stdout, (ref, result.output)
    missing = tlm("score", "--evaluator", "nope@latest", "--input", str(rows), *address)
    assert missing.exit_code == 2
    assert "evaluators/nope/revisions/latest" in missing.stderr.splitlines()[0]


def test_the_flag_suggested_is_the_one_that_set_the_address(
    embedded: ServerThread, tmp_path: Path, one_attempt: None
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"scorers": [{"name": "n", "length": {"max_length": 9}}]}))
    args = ["evaluators", "push", "e", str(spec), "--address", embedded.address]
    line = one_line(tlm(*args, "--registry-address", CLOSED), 2)
    assert line == (
        f"error: cannot reach the registry service at {CLOSED} (connection refused); "
        "start the services with `tlm up`, or pass --registry-address HOST:PORT"
    )


def test_list_commands_page_through_everything(
    embedded: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"scorers": [{"name": "n", "length": {"max_length": 9}}]}))
    names = [f"cli-page-{i}" for i in range(5)]
    for name in names:
        args = ["evaluators", "push", name, str(spec), "--address", embedded.address]
        pushed = tlm(*args, "--registry-address", embedded.address)
        assert pushed.exit_code == 0, pushed.output
    monkeypatch.setattr(registry_cmds, "PAGE_SIZE", 2)  # 3 pages
    listed = CliRunner().invoke(
        app,
        ["evaluators", "list", "--prefix", "cli-page-", "--address", embedded.address],
        terminal_width=200,
    )
    assert listed.exit_code == 0, listed.output
    assert [n for n in names if f"evaluators/{n} " in listed.stdout] == names


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    """`tlm ... | head`: the reader goes away before the command writes its output."""
    proc = subprocess.Popen(
        [*TLM, "evaluators", "init", "--template", "math"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # nobody reads: the first write hits a closed pipe
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr


def test_help_shows_bracketed_syntax_literally() -> None:
    """Help goes through Rich markup: `NAME[@REV]` must not lose its `[@REV]`."""
    env = {**os.environ, "COLUMNS": "160"}
    out = subprocess.run(
        [*TLM, "models", "show", "--help"], capture_output=True, text=True, env=env, timeout=60
    ).stdout
    assert "NAME[@REV]" in out
