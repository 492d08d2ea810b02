"""`tlm deployments ...`: the deploy service from the shell.

Each command is one or two calls of the deploy client (services/clients/deploy.py); models are
written MODEL[@REV|@ALIAS] as everywhere in `tlm` (no @: the `latest` alias, followed as it
moves). Mounted by services/cli/main.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.cli import errors
from services.cli.errors import HandledGroup, UserError
from services.cli.registry_cmds import revision_name, show_json
from services.clients.deploy import DeployClient
from services.common.proto_json import short_name
from tlm.deploy.v1 import deploy_pb2 as pb

console = Console()
deployments_app = typer.Typer(
    cls=HandledGroup,
    help="Deployments: a model revision or alias served on the serving pool, with rollback.",
    no_args_is_help=True,
)
AddressOpt = Annotated[str | None, typer.Option(help="Deploy service address.")]
ModelOpt = Annotated[str | None, typer.Option(help="MODEL[@REV|@ALIAS] (default alias: latest).")]
AdapterOpt = Annotated[str | None, typer.Option(help="LoRA adapter ADAPTER[@REV|@ALIAS].")]
ReplicasOpt = Annotated[int | None, typer.Option(help="Serving replicas warmed (1..64).")]
TemperatureOpt = Annotated[float | None, typer.Option(help="Default temperature.")]
TopPOpt = Annotated[float | None, typer.Option(help="Default top_p.")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Default max_tokens.")]
WaitOpt = Annotated[bool, typer.Option(help="Wait until READY (exit 1 if it FAILED).")]
WAIT_POLL_S = 0.5
WAIT_LIMIT_S = 1800.0


def _name(name: str) -> str:
    return name if name.startswith("deployments/") else f"deployments/{name}"


def _run(address: str | None, fn: Any) -> Any:
    return errors.call(DeployClient, address, fn)


def _sampling(
    temperature: float | None, top_p: float | None, max_tokens: int | None
) -> pb.SamplingDefaults | None:
    if temperature is None and top_p is None and max_tokens is None:
        return None
    return pb.SamplingDefaults(temperature=temperature, top_p=top_p, max_tokens=max_tokens)


def _print(d: pb.Deployment) -> None:
    serving = d.model_revision or "-"
    if d.adapter_revision:
        serving += f" + {d.adapter_revision}"
    line = f"[bold]{d.name}[/] {short_name(pb.Deployment.State, d.state)}: serving {serving}"
    if d.pending_model_revision:
        line += f", pending {d.pending_model_revision}"
    if d.previous_model_revision:
        line += f", rollback to {d.previous_model_revision}"
    console.print(line, soft_wrap=True)
    if d.state_reason:
        console.print(f"  {d.state_reason}", markup=False, soft_wrap=True)


def _wait(address: str | None, name: str) -> pb.Deployment:
    """Poll until the deployment leaves PENDING."""

    async def poll(client: DeployClient) -> pb.Deployment:
        deadline = time.monotonic() + WAIT_LIMIT_S
        while True:
            d = await client.get_deployment(name)
            if d.state != pb.Deployment.STATE_PENDING or time.monotonic() > deadline:
                return d
            await asyncio.sleep(WAIT_POLL_S)

    d = _run(address, poll)
    _print(d)
    if d.state != pb.Deployment.STATE_READY:
        raise typer.Exit(1)
    return d


@deployments_app.command("create")
def create(
    name: str,
    model: Annotated[str, typer.Option(help="MODEL[@REV|@ALIAS] (default alias: latest).")],
    adapter: AdapterOpt = None,
    replicas: Annotated[int, typer.Option(help="Serving replicas warmed (1..64).")] = 1,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokensOpt = None,
    description: str = "",
    request_id: Annotated[str, typer.Option(help="Idempotency key for retries.")] = "",
    wait: WaitOpt = False,
    address: AddressOpt = None,
) -> None:
    """Deploy MODEL under NAME (the `model` that OpenAI clients send)."""
    deployment = pb.Deployment(
        model=revision_name("models", model),
        adapter=revision_name("models", adapter) if adapter else "",
        replicas=replicas,
        sampling_defaults=_sampling(temperature, top_p, max_tokens),
        description=description,
    )
    d = _run(address, lambda c: c.create_deployment(name, deployment, request_id))
    _wait(address, d.name) if wait else _print(d)


@deployments_app.command("list")
def list_(address: AddressOpt = None) -> None:
    """List deployments."""
    table = Table("name", "state", "model", "serving", "previous")
    for d in _run(address, lambda c: c.list_deployments()):
        state = short_name(pb.Deployment.State, d.state)
        table.add_row(d.name, state, d.model, d.model_revision, d.previous_model_revision)
    console.print(table)


@deployments_app.command("show")
def show(name: str, address: AddressOpt = None) -> None:
    """Show a deployment as JSON."""
    show_json(_run(address, lambda c: c.get_deployment(_name(name))))


@deployments_app.command("update")
def update(
    name: str,
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    no_adapter: Annotated[bool, typer.Option(help="Serve the model without its adapter.")] = False,
    replicas: ReplicasOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    max_tokens: MaxTokensOpt = None,
    description: str | None = None,
    wait: WaitOpt = False,
    address: AddressOpt = None,
) -> None:
    """Change a deployment; a new --model or --adapter rolls it to that revision."""
    d = pb.Deployment(name=_name(name))
    paths: list[str] = []
    if model is not None:
        d.model, paths = revision_name("models", model), [*paths, "model"]
    if adapter is not None or no_adapter:
        d.adapter, paths = revision_name("models", adapter) if adapter else "", [*paths, "adapter"]
    if replicas is not None:
        d.replicas, paths = replicas, [*paths, "replicas"]
    sampling = _sampling(temperature, top_p, max_tokens)
    if sampling is not None:
        d.sampling_defaults.CopyFrom(sampling)
        paths.append("sampling_defaults")
    if description is not None:
        d.description, paths = description, [*paths, "description"]
    if not paths:
        raise UserError("nothing to update: pass --model, --adapter, --replicas, ...")
    updated = _run(address, lambda c: c.update_deployment(d, paths))
    _wait(address, updated.name) if wait else _print(updated)


@deployments_app.command("rollback")
def rollback(name: str, wait: WaitOpt = False, address: AddressOpt = None) -> None:
    """Roll back to the previous revision (and pin the deployment to it)."""
    d = _run(address, lambda c: c.rollback_deployment(_name(name)))
    _wait(address, d.name) if wait else _print(d)


@deployments_app.command("refresh")
def refresh(name: str, address: AddressOpt = None) -> None:
    """Re-resolve the deployment's alias now; roll it if the alias moved."""
    response = _run(address, lambda c: c.refresh_deployment(_name(name)))
    _print(response.deployment)
    console.print("rolling to the alias' new revision" if response.rolled else "unchanged")


@deployments_app.command("delete")
def delete(name: str, address: AddressOpt = None) -> None:
    """Delete a deployment; the gateway stops serving it at once."""
    _run(address, lambda c: c.delete_deployment(_name(name)))
    console.print(f"deleted {_name(name)}")
