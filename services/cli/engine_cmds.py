"""`tlm engine status`: what the rollout service serves and how busy it is. Mounted by main.py
as `engine_app`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.cli import errors
from services.cli.errors import HandledGroup
from services.clients.rollout import RolloutClient

console = Console()
engine_app = typer.Typer(cls=HandledGroup, help="The rollout engine.", no_args_is_help=True)


@engine_app.command("status")
def status(
    address: Annotated[str | None, typer.Option(help="Rollout service address.")] = None,
) -> None:
    """Loaded model and adapters, queue depth and tokens per second."""
    s = errors.call(RolloutClient, address, lambda c: c.engine_status(timeout_s=10))
    adapters = "\n".join(a.adapter_revision for a in s.adapters)
    rows = {
        "engine": f"{s.engine} on {s.device}",
        "model": s.model_revision or "(none loaded)",
        "adapters": adapters or "(none)",
        "queue": f"{s.queue_depth} waiting of {s.max_queue}, {s.running} running",
        "tokens/s": f"{s.tokens_per_second:.1f} (last minute)",
        "generated": f"{s.generated_tokens_total:,} tokens",
        "limits": f"context {s.max_model_len or '-'} tokens, n <= {s.max_n}",
    }
    table = Table("", "", title="rollout engine", show_header=False)
    for key, value in rows.items():
        table.add_row(key, Text(value))
    console.print(table)
