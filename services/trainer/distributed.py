"""Multi-device jobs on torch.distributed: a job whose plan has more than one device runs as a
torchrun worker group, one worker process per device.

- `launch_command`: what the supervisor starts; the plain worker for one device, else this
  module as the group's launcher: `python -m services.trainer.distributed --nproc-per-node N
  [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB] -m <worker>
  <folder>`, torchrun's own arguments (`torch.distributed.run`), run by torchrun's own agent.
- The launcher adds what the service needs around torchrun's agent: a SIGTERM stops the
  ranks; it is a cancel only when the service wrote the folder's `CANCEL_FILE` before sending
  it (`Workers.stop`), and then rank 0 reports the cancel. Any other SIGTERM (a Kubernetes
  eviction, preemption or node drain) is a kill: the launcher dies by it, so the supervisor
  restarts the group from its last checkpoint. The supervisor, not the agent, clears the file
  before a start: an agent starting late must not erase a cancel already asked for.
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
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from services.trainer.worker_protocol import EventWriter

CANCEL_FILE = "cancel"  # in the job folder: the service cancelled the group
RANK_ERRORS = "rank-errors"  # in the job folder: each failed rank's error event, by rank
LAUNCHER = "services.trainer.distributed"


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


def end_rank(code: int) -> NoReturn:
    """Exit a process with `code`; a rank of a group skips the interpreter's finalization
    (`os._exit`, after flushing its output): objects that still hold the torch.distributed
    group after `destroy_process_group` (FSDP's device mesh, pending gloo work) would otherwise
    be destroyed after the interpreter, which can abort the rank (SIGABRT, "terminate called
    without an active exception") after a run that ended well, and torchrun would then count it
    as a failure."""
    if world_size() == 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def die_by(sig: int) -> int:
    """End this process by `sig`, as the rank it stands for ended; the exit status 128+N for
    when the kernel ignores it (as pid 1 in a container, where a pod's exit code 128+N says the
    same to the Kubernetes launcher)."""
    with contextlib.suppress(OSError):  # SIGKILL has no handler to reset
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    return 128 + sig


def _killed_by(failure: Any) -> int:
    """The signal that killed a rank, 0 for an exit; SIGTERM counts as none: torchrun's agent
    sends it to the other ranks once one failed."""
    code = failure.exitcode
    if code < 0 and -code in signal.Signals.__members__.values() and -code != signal.SIGTERM:
        return -code
    return 0


def root_cause(folder: Path, failures: dict[int, Any]) -> tuple[dict[str, Any], int, int]:
    """How the group ended (`failures`: torchrun's ProcessFailure by global rank, the failed
    ranks and those its agent then stopped), and the rank to blame. A rank killed by a signal
    without a word (SIGKILL, the OOM killer): ({}, the signal), which the launcher passes on so
    that the supervisor restarts the group from its last checkpoint, as it restarts a lone
    worker; its peers' errors ("connection closed by peer") are its consequences. Else (the
    error event that ends the job, 0): the lowest rank's own error. Not torchrun's order: its
    failures carry the second they were collected in, the same for all."""
    errors = folder / RANK_ERRORS
    for r in sorted(failures):
        if _killed_by(failures[r]) and not (errors / f"{r}.json").exists():
            return {}, _killed_by(failures[r]), r
    for r in sorted(failures):
        with contextlib.suppress(OSError, ValueError):
            return json.loads((errors / f"{r}.json").read_text()), 0, r
    stopped = {r for r, f in failures.items() if f.exitcode == -signal.SIGTERM}
    first = min(set(failures) - stopped or failures)
    message = f"rank {first} exited with code {failures[first].exitcode}; see the worker log"
    return {"code": "ABORTED", "message": message}, 0, first


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
    try:
        # torchrun's agent answers a SIGTERM itself (--signals-to-handle): SIGTERM to every
        # rank, SIGKILL after its shutdown timeout, then SignalException here.
        run(args)
    except SignalException as exc:
        # A cancel only when the service wrote the file before it signalled (never here: an
        # eviction's SIGTERM is no cancel, and a late agent must not erase one).
        if (folder / CANCEL_FILE).exists():
            return 0  # cancelled: the ranks reported it
        events = EventWriter(folder)
        message = f"the group was stopped by {exc.sigval.name} without a cancel (an eviction?)"
        events.emit("log", level="warning", message=message)
        events.close()
        return die_by(exc.sigval)  # the supervisor restarts it from its checkpoint
    except ChildFailedError as exc:
        failures = exc.failures
        error, killed_by, first = root_cause(folder, failures)
        events = EventWriter(folder)
        if killed_by:
            name = signal.Signals(killed_by).name
            events.emit("log", level="warning", message=f"rank {first} was killed by {name}")
            events.close()
            return die_by(killed_by)  # die as the rank died: the supervisor restarts
        events.emit("error", **error)
        events.close()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# FSDP2 and sharded checkpoints -------------------------------------------------------------
# The pieces of a sharded model on torch.distributed itself, for loops of our own (the online
# actor); TRL's trainers get the same through accelerate.


def shard_model(model: Any, sum_gradients: bool = False) -> Any:
    """FSDP2: `fully_shard` each decoder layer (the model's `_no_split_modules`), then the
    whole model (embeddings, norm, head), as torchtitan does, so a layer's full weights exist
    only while it computes. The model trains as before; its parameters become DTensor shards.
    FSDP averages the gradients over the ranks; `sum_gradients` sums them instead (a loss
    already weighted by each rank's share of the global batch), with plain SUM collectives
    (gloo has no pre-multiplied sum)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in names:
            fully_shard(module)
    fully_shard(model)
    if sum_gradients:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
    return model


def load_model(auto: Any, path: Any, dtype: Any, device: str, **config: Any) -> Any:
    """`auto.from_pretrained(path, dtype=dtype, **config)` on `device`; on "meta" its
    structure alone, the config read and no weight read or allocated (a sharded group's ranks
    other than 0, which `shard_from_rank0` gives their shards of rank 0's weights)."""
    import torch
    from transformers import AutoConfig

    if device == "meta":
        settings = AutoConfig.from_pretrained(path, **config)
        with torch.device("meta"):
            return auto.from_config(settings, dtype=dtype)
    model = auto.from_pretrained(path, dtype=dtype, **config)
    return model.to(torch.device(device))


def shard_from_rank0(
    model: Any, device: str, parts: Sequence[Any] = (), sum_gradients: bool = False
) -> None:
    """`shard_model` for a group in which only rank 0 built the model with its weights (every
    other rank: `load_model` on "meta", or a copy of one), so that no rank but 0 reads the
    checkpoint or holds the whole model, however many ranks a node runs. The model (or each of
    its `parts`, when they are sharded apart) is sharded; then the other ranks allocate their
    shards on `device` ("cpu", or "cuda": this rank's GPU) and receive them from rank 0
    (torch.distributed.checkpoint's `set_model_state_dict`, broadcast from rank 0), and buffers
    outside the state dict (rotary embeddings' `inv_freq`, computed when the model is built)
    are broadcast too. A collective; the model then trains as if every rank had loaded it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # Rank 0's full tensors: its state dict keeps them once sharding replaced the parameters.
    weights = model.state_dict()
    kept = set(weights)
    if rank() != 0:
        weights = {}
    for part in parts or [model]:
        shard_model(part, sum_gradients)
    if rank() != 0:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    buffers = [(n, b) for n, b in model.named_buffers() if n not in kept]
    # A raw broadcast needs the same buffers everywhere (from_config and from_pretrained could
    # differ, e.g. a module kept in fp32): a clear error rather than corrupt values or a hang.
    shapes = [(n, str(b.dtype), tuple(b.shape)) for n, b in buffers]
    box = [shapes]
    dist.broadcast_object_list(box, src=0)
    if box[0] != shapes:
        raise RuntimeError(f"rank {rank()}: buffers {shapes} differ from rank 0's {box[0]}")
    for _, buffer in buffers:
        dist.broadcast(buffer, src=0)


def is_sharded(model: Any) -> bool:
    """Whether `model` was sharded by `shard_model` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: Any) -> dict[str, Any]:
    """The unsharded state dict on rank 0, on CPU (empty on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_trainable(model: Any) -> dict[str, Any]:
    """The unsharded trainable parameters (LoRA's adapters: not the frozen base) on rank 0, on
    CPU (empty on the other ranks), by their state-dict names; a collective (one all-gather
    per parameter, in the same order on every rank)."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            if rank() == 0:
                out[name] = full.detach().cpu()
    return out


def unique_names(model: Any) -> set[str]:
    """The state-dict names of `model` without tied aliases (a tied head is its embedding):
    the first name of each tensor, as `save_pretrained` writes them. A gathered state dict
    holds a copy per name."""
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        seen.setdefault(id(tensor), name)
    return set(seen.values())


def _trainable_options(strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (LoRA's base) come from the base model again: not in the checkpoint, and
    # not missing when it loads (DCP itself fails on a trainable tensor it lacks).
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded(folder: Path, model: Any, optimizer: Any) -> None:
    """Trainable weights and optimizer state with torch.distributed.checkpoint: each rank
    writes its own shards in parallel, and the checkpoint loads on any number of ranks (DCP
    reshards); a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_trainable_options())
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)


def load_sharded(folder: Path, model: Any, optimizer: Any) -> None:
    """`save_sharded`'s checkpoint into this group's model and optimizer, whatever the number
    of ranks that wrote it (one process, unsharded, too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _trainable_options(strict=False)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=folder)  # in place
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=options,
    )
