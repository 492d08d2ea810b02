"""Multi-device jobs on torch.distributed: a job whose plan has more than one device runs as a
torchrun worker group, one worker process per device.

- `launch_command`: what the supervisor starts; the plain worker for one device, else this
  module as the group's launcher: `python -m services.trainer.distributed --nproc-per-node N
  [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB] -m <worker>
  <folder>`, torchrun's own arguments (`torch.distributed.run`), run by torchrun's own agent.
- The launcher adds what the service needs around torchrun's agent: a SIGTERM from the
  service (cancel) is recorded in the folder (`CANCEL_FILE`) before the agent stops the ranks,
  so a rank stopped by a cancel reports it and a rank stopped because a peer died does not.
  When a rank fails, torchrun's first failure is the root cause: that rank's own error becomes
  the job's error; a rank killed by a signal without a word (SIGKILL, the OOM killer) makes the
  launcher die by the same signal, so the supervisor restarts the group from its last
  checkpoint within `max_restarts`, as it restarts a lone worker.
- `RankEvents`: rank 0 reports progress; every rank's error goes to a file of its own.
- `stop_agreed`: every rank stops at the same step (a collective would hang otherwise).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from services.trainer.worker_protocol import EventWriter

CANCEL_FILE = "cancel"  # in the job folder: the service cancelled the group
RANK_ERRORS = "rank-errors"  # in the job folder: each failed rank's error event, by rank
LAUNCHER = "services.trainer.distributed"
# The signals torchrun's agent handles itself; SIGTERM is ours (see `_on_sigterm`).
AGENT_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def group_size(plan: dict[str, Any]) -> int:
    """Processes in the job's group, over all nodes.

    >>> group_size({"devices_per_node": 4, "num_nodes": 2})
    8
    >>> group_size({})
    1
    """
    return int(plan.get("devices_per_node", 1)) * int(plan.get("num_nodes", 1))


def launch_command(
    module: str, folder: Path, plan: dict[str, Any], rendezvous: str = "", job_id: str = ""
) -> list[str]:
    """The command that runs the job: the worker itself for one device, else torchrun's agent
    (through this module) with one worker per device; `rendezvous` (HOST:PORT, c10d) joins
    several nodes, else the group is standalone on this host.

    >>> launch_command("w", Path("/j"), {"devices_per_node": 1})[1:]
    ['-m', 'w', '/j']
    >>> two = {"devices_per_node": 2}
    >>> launch_command("w", Path("/j"), two)[1:]  # doctest: +NORMALIZE_WHITESPACE
    ['-m', 'services.trainer.distributed', '--nproc-per-node', '2', '--standalone',
     '--max-restarts', '0', '-m', 'w', '/j']
    """
    if group_size(plan) == 1:
        return [sys.executable, "-m", module, str(folder)]
    nodes = int(plan.get("num_nodes", 1))
    args = [sys.executable, "-m", LAUNCHER, "--nproc-per-node", str(plan["devices_per_node"])]
    if nodes > 1 or rendezvous:
        args += ["--nnodes", str(nodes), "--rdzv-backend", "c10d"]
        args += ["--rdzv-endpoint", rendezvous, "--rdzv-id", job_id or folder.name]
    else:
        args.append("--standalone")
    return [*args, "--max-restarts", "0", "-m", module, str(folder)]


# Ranks ---------------------------------------------------------------------------------------


def rank() -> int:
    """This process's global rank (0 outside a group); torchrun sets RANK."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class RankEvents(EventWriter):
    """The events of one rank: rank 0 reports progress; in a group every rank's error goes to
    its own file (`RANK_ERRORS/<rank>.json`, named by rank) for the launcher to pick the root
    cause, and a stop is a cancel only when the service asked for it (`CANCEL_FILE`): a rank
    stopped by torchrun because a peer died says nothing."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.folder = folder

    def emit(self, kind: str, **data: Any) -> None:
        grouped, me = world_size() > 1, rank()
        if kind == "error" and grouped:
            errors = self.folder / RANK_ERRORS
            errors.mkdir(exist_ok=True)
            data = data | {"message": f"rank {me}: {data.get('message', '')}"}
            (errors / f"{me}.json").write_text(json.dumps(data))
            return
        if me != 0:
            return
        if kind == "cancelled" and grouped and not (self.folder / CANCEL_FILE).exists():
            return
        super().emit(kind, **data)


def exit_status(failed: bool) -> int:
    """A rank that failed exits non-zero so torchrun stops the group at once (its peers would
    wait in a collective); a lone worker reports through its events and exits 0."""
    return 1 if failed and world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def stop_agreed(stop: bool) -> bool:
    """Whether any rank was asked to stop, agreed by all (one all-reduce of a flag), so every
    rank leaves the training loop after the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stop
    flag = torch.tensor([1 if stop else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# The launcher ------------------------------------------------------------------------------


def _on_sigterm(folder: Path) -> Any:
    def handler(signum: int, _frame: Any) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        (folder / CANCEL_FILE).touch()
        # torchrun's agent answers this as it answers its own handler: SIGTERM to every rank,
        # SIGKILL after its shutdown timeout.
        raise SignalException(f"cancelled (pid {os.getpid()})", sigval=signal.Signals(signum))

    return handler


def root_cause(folder: Path, failures: dict[int, Any]) -> tuple[dict[str, Any], int]:
    """How the group ended, from torchrun's first failure (`failures`: ProcessFailure by global
    rank): (the error event that ends the job, 0), or for a rank killed by a signal without a
    word (SIGKILL, the OOM killer) ({}, the signal), which the launcher passes on so that the
    supervisor restarts the group from its last checkpoint, as it restarts a lone worker."""
    first = min(failures, key=lambda r: failures[r].timestamp)
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / RANK_ERRORS / f"{first}.json").read_text()), 0
    code = failures[first].exitcode
    if code < 0 and -code in signal.Signals.__members__.values():
        return {}, -code
    message = f"rank {first} exited with code {code}; see the worker log"
    return {"code": "ABORTED", "message": message}, 0


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG (Linux): SIGKILL when the service that started this process dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def main(argv: list[str]) -> int:
    """torchrun, with the service's cancel and failure reporting (see the module docstring)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _die_with_parent()  # the service's death ends the group too (its ranks die with this)
    args = parse_args(argv)
    folder = Path(args.training_script_args[-1])
    (folder / CANCEL_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder / RANK_ERRORS, ignore_errors=True)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = AGENT_SIGNALS
    signal.signal(signal.SIGTERM, _on_sigterm(folder))
    try:
        run(args)
    except SignalException:
        return 0  # cancelled: the ranks reported it
    except ChildFailedError as exc:
        failures = exc.failures
        error, killed_by = root_cause(folder, failures)
        events = EventWriter(folder)
        if killed_by:
            first = min(failures, key=lambda r: failures[r].timestamp)
            name = signal.Signals(killed_by).name
            events.emit("log", level="warning", message=f"rank {first} was killed by {name}")
            events.close()
            with contextlib.suppress(OSError):  # SIGKILL has no handler to reset
                signal.signal(killed_by, signal.SIG_DFL)
            os.kill(os.getpid(), killed_by)  # die as the rank died: the supervisor restarts
        events.emit("error", **error)
        events.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# FSDP2 and sharded checkpoints -------------------------------------------------------------
# The pieces of a sharded model on torch.distributed itself, for loops of our own (the online
# actor); TRL's trainers get the same through accelerate.


def shard_model(model: Any) -> Any:
    """FSDP2: `fully_shard` each decoder layer (the model's `_no_split_modules`), then the
    whole model (embeddings, norm, head), as torchtitan does, so a layer's full weights exist
    only while it computes. The model trains as before; its parameters become DTensor shards."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in names:
            fully_shard(module)
    fully_shard(model)
    return model


def full_state_dict(model: Any) -> dict[str, Any]:
    """The unsharded state dict on rank 0, on CPU (empty on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_sharded(folder: Path, model: Any, optimizer: Any) -> None:
    """Model and optimizer state with torch.distributed.checkpoint: each rank writes its own
    shards in parallel, and the checkpoint loads on any number of ranks (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)


def load_sharded(folder: Path, model: Any, optimizer: Any) -> None:
    """`save_sharded`'s checkpoint into this group's model and optimizer, whatever the number
    of ranks that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=folder)  # in place
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
