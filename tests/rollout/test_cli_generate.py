"""`tlm generate` against the embedded services: load on first use, then generate."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from services.cli.errors import HandledGroup
from services.cli.rollout_cmds import generate, revision_name
from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from tlm.registry.v1 import registry_pb2


def test_revision_name() -> None:
    assert revision_name("tiny") == "models/tiny/revisions/latest"
    assert revision_name("tiny@r2") == "models/tiny/revisions/r2"


async def test_generate_loads_the_model_then_prints(
    embedded: ServerThread, tiny_model_dir: Path
) -> None:
    registry = RegistryClient(embedded.address)
    try:
        await registry.stub.CreateModel(
            registry_pb2.CreateModelRequest(model_id="rollout-cli-tiny")
        )
        revision = await registry.upload_model_revision("models/rollout-cli-tiny", tiny_model_dir)
        newer = await registry.upload_model_revision("models/rollout-cli-tiny", tiny_model_dir)
    finally:
        await registry.close()
    app = typer.Typer(cls=HandledGroup)  # errors reported as `tlm` reports them
    app.command()(generate)
    app.command("unused")(lambda: None)  # two commands: `generate` is then a subcommand
    model = f"rollout-cli-tiny@{revision.name.rsplit('/', 1)[1]}"
    addresses = ["--address", embedded.address, "--registry-address", embedded.address]
    args = ["generate", "--model", model, "--prompt", "The red cat", "-n", "2"]
    args += ["--max-tokens", "5", "--seed", "1", *addresses]
    # --load: another test may have left a model on this shared server.
    result = CliRunner().invoke(app, [*args, "--load"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "loaded" in result.output and revision.name in result.output
    again = CliRunner().invoke(app, args, terminal_width=200)  # already loaded: no reload
    assert again.exit_code == 0 and "loaded" not in again.output
    assert again.stdout == result.stdout  # same seed, same table
    bad = CliRunner().invoke(app, [*args, "--temperature", "-1"])
    assert bad.exit_code == 2 and "INVALID_ARGUMENT" in bad.output

    # Another revision replaces the served one only with --load.
    latest = [a if a != model else "rollout-cli-tiny" for a in args]
    refused = CliRunner().invoke(app, latest, terminal_width=200)
    assert refused.exit_code == 2 and "--load" in refused.output
    assert revision.name in refused.output
    replaced = CliRunner().invoke(app, [*latest, "--load"], terminal_width=200)
    assert replaced.exit_code == 0 and newer.name in replaced.output


def test_generate_reports_an_unreachable_registry(embedded: ServerThread) -> None:
    app = typer.Typer(cls=HandledGroup)  # errors reported as `tlm` reports them
    app.command()(generate)
    app.command("unused")(lambda: None)
    args = ["generate", "--model", "rollout-cli-tiny", "--prompt", "hi"]
    args += ["--address", embedded.address, "--registry-address", "127.0.0.1:1"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 2 and result.stderr == (
        "error: cannot reach the registry service at 127.0.0.1:1 (connection refused); "
        "start the services with `tlm up`, or pass --registry-address HOST:PORT\n"
    )
