"""`tlm generate`: load a model (and adapter) on the rollout service if needed, then generate.

Revisions are resolved with the registry (--registry-address, TLM_REGISTRY_ADDRESS, TLM_ADDRESS).
A different model already served is replaced only with --load.

Mounted by services/cli/main.py with `app.command()(generate)`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from services.cli import registry_cmds
from services.cli.errors import UserError, remote, run_sync
from services.clients.registry import RegistryClient
from services.clients.rollout import RolloutClient
from services.common.errors import NotFound
from tlm.common.v1 import common_pb2
from tlm.rollout.v1 import rollout_pb2

console = Console()
err_console = Console(stderr=True)
FINISH = {
    rollout_pb2.FINISH_REASON_STOP: "stop",
    rollout_pb2.FINISH_REASON_LENGTH: "length",
    rollout_pb2.FINISH_REASON_ABORT: "abort",
}


def revision_name(spec: str) -> str:
    """'NAME[@REV]' -> 'models/NAME/revisions/REV' (REV defaults to 'latest').

    >>> revision_name("tiny"), revision_name("tiny@r2")
    ('models/tiny/revisions/latest', 'models/tiny/revisions/r2')
    """
    return registry_cmds.revision_name("models", spec)


async def _resolve(registry: RegistryClient, name: str) -> str:
    """The registry's resolved name for `name`; `name` itself if the registry does not know it
    (the rollout service then reports it)."""
    try:
        return (await registry.get_model_revision(name)).name
    except NotFound:
        return name


async def _generate(
    rollout: RolloutClient,
    registry: RegistryClient,
    model: str,
    adapter: str | None,
    request: rollout_pb2.GenerateRequest,
    load: bool,
) -> list[rollout_pb2.Completion]:
    status = await rollout.engine_status(timeout_s=10)
    wanted = await _resolve(registry, revision_name(model))
    if status.model_revision and status.model_revision != wanted and not load:
        raise UserError(
            f"the rollout service serves {status.model_revision}, not {wanted}; "
            "pass --load to replace it"
        )
    if status.model_revision != wanted:
        loaded = await rollout.load_model(wanted, timeout_s=600)
        err_console.print(f"loaded [bold]{escape(loaded.policy_version)}[/]")
    if adapter is not None:
        lora = await _resolve(registry, revision_name(adapter))
        if lora not in {a.adapter_revision for a in status.adapters}:
            await rollout.load_adapter(lora, timeout_s=600)
            err_console.print(f"loaded adapter [bold]{escape(lora)}[/]")
        request.adapter_revision = lora
    return await rollout.generate_all(request, timeout_s=600)


async def _run(
    rollout_address: str, registry_address: str, *args: object
) -> list[rollout_pb2.Completion]:
    async with (
        RolloutClient(rollout_address) as rollout,
        RegistryClient(registry_address) as registry,
    ):
        return await _generate(rollout, registry, *args)  # type: ignore[arg-type]


def generate(
    model: Annotated[str, typer.Option("--model", help="NAME\\[@REV] of a model in the registry.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt text.")],
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="NAME@REV of a LoRA adapter on that model.")
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Send the prompt as a user turn (chat template).")
    ] = False,
    n: Annotated[int, typer.Option("-n", help="Completions per prompt.")] = 1,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="New tokens per completion.")] = 64,
    seed: Annotated[int | None, typer.Option(help="Same seed, same output.")] = None,
    address: Annotated[
        str | None, typer.Option(help="Rollout address (else TLM_ROLLOUT_ADDRESS, TLM_ADDRESS).")
    ] = None,
    registry_address: Annotated[
        str | None,
        typer.Option(help="Registry address (else TLM_REGISTRY_ADDRESS, TLM_ADDRESS)."),
    ] = None,
    load: Annotated[
        bool, typer.Option("--load", help="Replace the model the service serves if it differs.")
    ] = False,
) -> None:
    """Generate completions with the rollout service, loading the model first if none is
    served (or, with --load, if another one is)."""
    sampling = rollout_pb2.SamplingParams(
        n=n, temperature=temperature, max_tokens=max_tokens, seed=seed
    )
    request = rollout_pb2.GenerateRequest(prompts=[_prompt(prompt, chat)], sampling=sampling)
    with (
        remote("rollout", address) as target,
        remote("registry", registry_address, "--registry-address") as registry_target,
    ):
        completions = run_sync(_run(target, registry_target, model, adapter, request, load))
    table = Table("#", "finish", "tokens", "policy version", "text", show_lines=True)
    for c in sorted(completions, key=lambda c: c.sample_index):
        finish = FINISH.get(c.finish_reason, "?")
        row = (str(c.sample_index), finish, str(len(c.token_ids)), c.policy_version, c.text)
        table.add_row(*(Text(cell) for cell in row))  # generated text is literal, not markup
    console.print(table)


def _prompt(text: str, chat: bool) -> common_pb2.Prompt:
    if not chat:
        return common_pb2.Prompt(text=text)
    turn = common_pb2.ChatMessage(role="user", content=text)
    return common_pb2.Prompt(messages=common_pb2.Conversation(messages=[turn]))
