"""The online actor on several devices: a replicated (DDP-style) torchrun worker group.

Rank 0 runs the controller (`rl/controller.py`: the rollout, reward and registry calls, the
events, publishing and the resume state); every other rank runs `follow`, a loop that executes
rank 0's commands in the order sent, so that every rank enters the same collectives:

- `setup`: the base model's folder and the step count; each rank builds the same actor (same
  seed: the same LoRA initialisation).
- `update`: the generation batch and its advantages (computed once, on rank 0, over the whole
  batch, so the group normalisation of GRPO's advantages is global). The batch's micro-batches
  are dealt round-robin (micro-batch i to rank i mod world size); each rank accumulates the
  gradients of its own, each weighted by its share of the whole batch's loss (the actor's
  `MICRO_WEIGHTS`, computed from the whole batch's mask: the global normaliser), the gradients
  are summed over the ranks (`all_reduce`), and every rank takes the same optimizer step on the
  same summed gradient. The result is the one-process update up to the order of float sums.
- `load`: the resume state, read by rank 0 and sent to all.
- `stop`: the run ended (done, cancelled or failed outside a collective).

Every rank holds the whole model, reference and optimizer state (replicated, as DDP): the
weights rank 0 exports and publishes are every rank's, and its resume file restores any number
of ranks. Sharding them (FSDP2 `fully_shard`, DCP checkpoints: `distributed.py`) is not built
for the online actor yet.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map_only

from services.trainer.distributed import rank, world_size
from services.trainer.rl.batch import TokenBatch

# How long a rank waits in a collective. The followers wait for rank 0's next command while it
# downloads the base model, generates, scores and rides out service outages, so this is long; a
# rank that dies ends the group at once anyway (torchrun stops the others).
GROUP_TIMEOUT = timedelta(hours=12)
CPU = torch.device("cpu")  # where commands travel (pickled), whatever the ranks' devices


class Command(enum.StrEnum):
    """What rank 0 tells the other ranks, in the order its actor does it."""

    SETUP = "setup"  # (base model folder, total steps): build the actor
    UPDATE = "update"  # (batch, advantages, objective): train on this rank's share
    LOAD = "load"  # (resume state): restore it
    STOP = "stop"  # the run ended


class ActorGroup:
    """This process's place in the group and rank 0's command channel (a gloo group: objects
    travel on the CPU whatever the devices; gradients go over the default group)."""

    def __init__(self, me: int, size: int, commands: Any = None) -> None:
        self.rank, self.size, self.commands = me, size, commands

    # Commands ------------------------------------------------------------------------------

    def announce(self, command: Command, *args: Any) -> None:
        """Rank 0: send a command to the other ranks (tensors in containers are moved to the
        CPU; a TokenBatch goes as `batch_to(batch, CPU)`); a no-op on them, which run the same
        code when they execute it."""
        if self.rank != 0:
            return
        payload = tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), (command, *args))
        dist.broadcast_object_list([payload], src=0, group=self.commands)

    def receive(self) -> tuple[Any, ...]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return tuple(box[0])

    def stop(self) -> None:
        """Rank 0, at the end of a run that ended well (done or cancelled: the rank exits 0, and
        torchrun waits for the others). A rank that fails sends nothing (its peers may wait in
        another collective): it exits non-zero and torchrun stops the group."""
        self.announce(Command.STOP)
        self.close()

    # An update's share and reductions ----------------------------------------------------

    def mine(self, index: int) -> bool:
        """Whether micro-batch `index` of a batch is this rank's."""
        return index % self.size == self.rank

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum each gradient over the ranks; a rank without a micro-batch adds zeros."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def merge_means(
        self, sums: dict[str, float], weights: dict[str, float]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Weighted sums of statistics and their weights, added over the ranks."""
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, (sums, weights), group=self.commands)
        total_sums: dict[str, float] = {}
        total_weights: dict[str, float] = {}
        for part_sums, part_weights in gathered:
            for key, value in part_sums.items():
                total_sums[key] = total_sums.get(key, 0.0) + value
                total_weights[key] = total_weights.get(key, 0.0) + part_weights[key]
        return total_sums, total_weights

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def open_group(device: str) -> ActorGroup | None:
    """Join the torchrun group (None for one process): gloo on CPU; on CUDA, NCCL for the
    gradients on this rank's GPU (LOCAL_RANK) and a gloo group for the commands."""
    if world_size() == 1:
        return None
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=GROUP_TIMEOUT)
        commands = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
        commands = None  # the default group is gloo already
    return ActorGroup(rank(), world_size(), commands)


def batch_to(batch: TokenBatch, device: torch.device) -> TokenBatch:
    """`batch` on `device`: the CPU to send it, this rank's device when received."""
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        sampling_logp=batch.sampling_logp.to(device),
        mask=batch.mask.to(device),
    )


def _update(actor: Any, batch: TokenBatch, advantages: torch.Tensor, objective: Any) -> None:
    actor.update(batch_to(batch, actor.device), advantages.to(actor.device), objective)


# What a follower does on each command but SETUP and STOP (`actor`: rl.actor.Actor).
FOLLOWERS: dict[Command, Callable[..., None]] = {
    Command.UPDATE: _update,
    Command.LOAD: lambda actor, state: actor.load_state_dict(state),
}


def follow(actor: Any, group: ActorGroup) -> None:
    """A follower rank's loop (`actor` with `group` set): rank 0's commands, in order, until
    STOP. An error ends the rank (non-zero: torchrun stops the group)."""
    while True:
        command, *args = group.receive()
        if command == Command.STOP:
            group.close()
            return
        FOLLOWERS[Command(command)](actor, *args)
