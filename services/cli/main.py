"""The `tlm` command line: run the services, check them, and drive them.

Errors are one red line on stderr, exit 2 (a mistake in the command, an unreachable address,
a service's refusal; 1 only for a bug in tlm); `tlm --debug ...` shows the traceback instead.
Commands call the services through services/clients/. See services/cli/errors.py."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.cli.deploy_cmds import deployments_app
from services.cli.engine_cmds import engine_app
from services.cli.errors import HandledGroup, UserError, print_error, unreachable
from services.cli.estimate_cmds import estimate
from services.cli.export_cmds import merge as models_merge
from services.cli.export_cmds import pull as models_pull
from services.cli.health import check_health
from services.cli.http_cmds import HTTP_SERVERS, ready_writer, serve_http
from services.cli.registry_cmds import datasets_app, evaluators_list, evaluators_show, models_app
from services.cli.registry_manage import add_commands, datasets_append
from services.cli.review_cmds import reviews_app
from services.cli.reward_cmds import init as evaluators_init
from services.cli.reward_cmds import push as evaluators_push
from services.cli.reward_cmds import score
from services.cli.reward_cmds import validate as evaluators_validate
from services.cli.rollout_cmds import generate
from services.cli.trainer_cmds import jobs_app
from services.common.client import SERVICES, resolve_address
from services.common.logs import configure_logging

if TYPE_CHECKING:
    from services.common.server import RunningServer

app = typer.Typer(
    cls=HandledGroup, help="TLM: post-training LLMs as gRPC services.", no_args_is_help=True
)
dev_app = typer.Typer(cls=HandledGroup, help="Developer tools.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
add_commands(models_app, "models")
models_app.command("pull")(models_pull)
models_app.command("merge")(models_merge)
add_commands(datasets_app, "datasets")
datasets_app.command("append")(datasets_append)
evaluators_app = typer.Typer(
    cls=HandledGroup, help="Evaluator specs: the JSON that scores samples.", no_args_is_help=True
)
evaluators_app.command("list")(evaluators_list)
evaluators_app.command("show")(evaluators_show)
evaluators_app.command("init")(evaluators_init)
evaluators_app.command("validate")(evaluators_validate)
evaluators_app.command("push")(evaluators_push)
add_commands(evaluators_app, "evaluators")
app.add_typer(evaluators_app, name="evaluators")
app.command("score")(score)
app.command("generate")(generate)
jobs_app.command("estimate")(estimate)
app.add_typer(jobs_app, name="jobs")
app.add_typer(reviews_app, name="reviews")
app.add_typer(engine_app, name="engine")
app.add_typer(deployments_app, name="deployments")
console = Console()

PortOpt = Annotated[int | None, typer.Option(help="Port to bind; 0 picks a free one.")]
HostOpt = Annotated[str | None, typer.Option(help="Interface to bind.")]
InsecureOpt = Annotated[
    bool | None,
    typer.Option("--insecure-dev/--secure", help="Serve without API keys as team 'dev'."),
]
ReadyOpt = Annotated[
    Path | None, typer.Option(help="Write the bound address to this file once serving.")
]


def _ready_writer(ready_file: Path | None) -> Callable[[RunningServer], None]:
    announce = ready_writer("TLM serving", ready_file)
    return lambda running: announce(running.address)


@app.callback()
def root(
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="TLM_DEBUG", help="Show tracebacks instead of one line."),
    ] = False,
) -> None:
    """TLM: post-training LLMs as gRPC services."""
    # Read by HandledGroup (services/cli/errors.py) when a command fails.


@app.command()
def version() -> None:
    """Print the TLM version."""
    console.print(dist_version("tlm"))


@app.command()
def up(
    port: PortOpt = None,
    host: HostOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="SQLite, blobs and job files.")] = None,
    insecure_dev: InsecureOpt = None,
    ready_file: ReadyOpt = None,
    http_port: Annotated[
        int | None, typer.Option(help="Also serve the HTTP gateway and web console here.")
    ] = None,
) -> None:
    """Run every service in one process on one port (SQLite, local blobs, transformers)."""
    from services.embedded import SERVICE_ORDER, bindings_for, up_settings
    from services.gateway.server import serve_up

    settings = up_settings(port, host, data_dir, insecure_dev)
    configure_logging(settings.log_json, settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    bindings = bindings_for(SERVICE_ORDER, settings)
    asyncio.run(serve_up(bindings, settings, http_port, _ready_writer(ready_file)))


@app.command()
def serve(
    service: Annotated[
        str,
        typer.Argument(
            help="registry, reward, rollout, trainer, deploy, gateway or console (HTTP)"
        ),
    ],
    port: PortOpt = None,
    host: HostOpt = None,
    insecure_dev: InsecureOpt = None,
    ready_file: ReadyOpt = None,
) -> None:
    """Run one service, configured by TLM_<SERVICE>_... variables (for containers)."""
    from services.common.server import serve_forever
    from services.embedded import SERVICES as APPS
    from services.embedded import binding, service_settings

    if service in HTTP_SERVERS:
        serve_http(service, port, host, insecure_dev, ready_file)
        return
    if service not in APPS:
        raise UserError(f"unknown service {service!r}; expected one of {', '.join(APPS)}")
    settings = service_settings(service, port=port, host=host, insecure_dev=insecure_dev)
    configure_logging(settings.log_json, settings.log_level)
    bound = binding(service, settings)
    asyncio.run(serve_forever([bound], settings, _ready_writer(ready_file)))


@app.command()
def health(
    address: Annotated[
        str | None, typer.Option(envvar="TLM_ADDRESS", help="Address of every service.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each service.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check the gRPC health of every service; exit 1 unless all are SERVING."""
    results = {s: check_health(s, resolve_address(s, address), timeout) for s in SERVICES}
    if as_json:
        sys.stdout.write(json.dumps(results) + "\n")
    else:
        table = Table("service", "address", "status")
        for service, result in results.items():
            colour = "green" if result["status"] == "SERVING" else "red"
            table.add_row(service, result["address"], f"[{colour}]{result['status']}[/]")
        console.print(table)
    down: dict[str, list[str]] = {}
    for service, result in results.items():
        if result["status"] == "UNAVAILABLE":
            down.setdefault(result["address"], []).append(service)
    for where, services in down.items():
        print_error(unreachable(services, where))
    if any(r["status"] != "SERVING" for r in results.values()):
        raise typer.Exit(1)


@dev_app.command("tiny-model")
def tiny_model(
    out_dir: Path,
    size: Annotated[str, typer.Option(help="test (~100K params) or bench (~3.5M)")] = "test",
    kind: Annotated[str, typer.Option(help="causal-lm or reward-model")] = "causal-lm",
    seed: int = 0,
) -> None:
    """Build a tiny Qwen2 model and tokenizer offline, deterministically, as an HF folder."""
    from services.devtools.tiny_models import build_tiny_model

    try:
        path = build_tiny_model(out_dir, size=size, kind=kind, seed=seed)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    console.print(f"built {kind} ({size}) in {path}")


def main() -> None:
    # `tlm ... | head`: a closed pipe ends the command quietly, as for any Unix tool, rather
    # than as an "internal error" from the next write.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    app()


if __name__ == "__main__":
    main()
