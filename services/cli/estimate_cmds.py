"""`tlm jobs estimate`: what a job would need (device plan, memory per device by part) before
creating it. It takes exactly `tlm jobs create`'s spec flags, so its signature is create's,
less the flags that only creating a job reads. Mounted by main.py on `jobs_app`."""

from __future__ import annotations

import inspect
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.cli.trainer_cmds import NOT_SPEC, call, create, spec_from
from services.common import proto_json
from tlm.trainer.v1 import trainer_pb2 as pb

console = Console()
# create's parameters that estimate does not take: they do not describe the job.
CREATE_ONLY = frozenset({"request_id", "display_name", "validate_only", "watch_job"})


def human_bytes(n: float) -> str:
    """Bytes in binary units, three significant digits.

    >>> human_bytes(512), human_bytes(1536), human_bytes(3 * 2**30)
    ('512 B', '1.5 KiB', '3 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def estimate(**given: Any) -> None:
    """Estimate the devices and memory a job needs, without creating it.

    Takes `tlm jobs create`'s flags and --spec file; prints the plan and memory breakdown."""
    address, method, spec_file = given.pop("address"), given.pop("method"), given.pop("spec_file")
    spec = spec_from(spec_file, method, {k: v for k, v in given.items() if k not in NOT_SPEC})
    result = call(address, lambda c: c.estimate(spec))
    console.print(plan_table(result))
    console.print(memory_table(result))
    for note in result.notes:
        console.print(Text(note))  # literal: server text


def _short(enum: proto_json.EnumLike, number: int) -> str:
    return proto_json.short_name(enum, number).lower()


def plan_table(r: pb.EstimateResourcesResponse) -> Table:
    plan = r.plan
    devices = plan.devices_per_node or 1
    nodes = plan.num_nodes or 1
    table = Table("plan", "", title="resources", show_header=False)
    rows = {
        "devices": f"{devices * nodes} {_short(pb.DeviceType, plan.device_type)}"
        + (f" on {nodes} nodes" if nodes > 1 else ""),
        "strategy": _short(pb.ParallelStrategy, plan.strategy),
        "precision": plan.precision,
        "gradient checkpointing": "yes" if plan.gradient_checkpointing else "no",
        "cpu offload": "yes" if plan.cpu_offload else "no",
        "parameters": f"{r.parameter_count:,}",
        "trainable": f"{r.trainable_parameter_count:,}",
        "memory per device": human_bytes(r.memory_per_device_bytes),
        "fits": "[green]yes[/]" if r.fits else "[red]no[/]",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table


def memory_table(r: pb.EstimateResourcesResponse) -> Table:
    table = Table("part", "per device", "share", title="memory per device")
    total = r.memory_per_device_bytes or 1
    for part, size in sorted(r.memory_breakdown_bytes.items(), key=lambda kv: -kv[1]):
        table.add_row(Text(part), human_bytes(size), f"{size / total:.0%}")
    return table


def _signature() -> inspect.Signature:
    """create's signature less CREATE_ONLY, annotations evaluated (typer reads them)."""
    params = inspect.signature(create, eval_str=True).parameters.values()
    kept = [p for p in params if p.name not in CREATE_ONLY]
    return inspect.Signature(kept, return_annotation=None)


setattr(estimate, "__signature__", _signature())  # noqa: B010 (typer reads it)
estimate.__annotations__ = {p.name: p.annotation for p in _signature().parameters.values()}
