"""The online actor on several devices: a torchrun worker group, replicated (DDP-style) or
sharded (FSDP2), as the job's plan says (`plan["strategy"]`: "ddp" or "fsdp").

Rank 0 runs the controller (`rl/controller.py`: the rollout, reward and registry calls, the
events, publishing and the resume state); every other rank runs `follow`, a loop that executes
rank 0's commands in the order sent, so that every rank enters the same collectives:

- `setup`: the base model's folder and the step count; each rank builds the same actor (same
  seed: the same LoRA initialisation), sharded when the plan says FSDP.
- `update`: the generation batch and its advantages (computed once, on rank 0, over the whole
  batch, so the group normalisation of GRPO's advantages is global). The batch's micro-batches
  are dealt round-robin (micro-batch i to rank i mod world size); each rank accumulates the
  gradients of its own, each weighted by its share of the whole batch's loss (the actor's
  `MICRO_WEIGHTS`, computed from the whole batch's mask: the global normaliser), the gradients
  are summed over the ranks, and every rank takes the same optimizer step on the same summed
  gradient (replicated: `all_reduce` of whole gradients; sharded: FSDP's reduce-scatter, set
  to sum). The result is the one-process update up to the order of float sums.
- `load`: where rank 0 read the resume state (its file in the job's folder, which every rank
  reads, as the sharded checkpoints require, and the entry): every rank restores it.
- `stop`: the run ended (done, cancelled or failed outside a collective).

Replicated, every rank holds the whole model, reference and optimizer state (as DDP): the
weights rank 0 exports and publishes are every rank's, and its resume file restores any number
of ranks. Sharded (FSDP2 `fully_shard`, `distributed.shard_model`), each rank holds 1/N of the
actor, of its reference and of the optimizer state, and every forward pass is a collective, so
whatever rank 0 did alone becomes a command too, with every rank running the same number of
forward and backward passes (a rank short of micro-batches pads with zero-weight ones):

- `kl`: the reference KL of a KL-in-reward estimator (RLOO, REINFORCE++), each rank computing
  its micro-batches, summed over the ranks (`by_micro_batch`);
- `gather`: the full weights (or LoRA's adapters) gathered to rank 0 to export and publish;
- `save`: the trainable weights and optimizer state as a sharded checkpoint
  (torch.distributed.checkpoint) beside rank 0's resume state; `load` reads it back on any
  number of ranks (DCP reshards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
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
# Where rank 0 read a resume state: the file (in the job's folder, shared by every rank) and
# the entry (`torch.load(file)[entry]`).
Saved = tuple[Path, str]


class Command(enum.StrEnum):
    """What rank 0 tells the other ranks, in the order its actor does it."""

    SETUP = "setup"  # (base model folder, total steps): build the actor
    UPDATE = "update"  # (batch, advantages, objective): train on this rank's share
    LOAD = "load"  # (state file, entry): restore the actor's resume state from it
    STOP = "stop"  # the run ended
    # Sharded (FSDP) actors only: what rank 0 did alone on a replica.
    KL = "kl"  # (batch, estimator, micro-batch size): the reference KL of this rank's share
    GATHER = "gather"  # (): the full weights or adapters, gathered to rank 0
    SAVE = "save"  # (checkpoint folder name): this rank's shards of the training state
    # PPO (`rl/ppo_learner.py`; a second SETUP sends the critic's folder): the follower's
    # learner trains on (batch, scores, kl_coef, batch count), restores (state file, entry).
    PPO_LEARN = "ppo_learn"
    PPO_LOAD = "ppo_load"
    CRITIC_SAVE = "critic_save"  # (checkpoint folder name): a sharded critic's `SAVE`


class ActorGroup:
    """This process's place in the group and rank 0's command channel (a gloo group: objects
    travel on the CPU whatever the devices; gradients go over the default group)."""

    def __init__(self, me: int, size: int, commands: Any = None) -> None:
        self.rank, self.size, self.commands = me, size, commands
        # Rank 0 sends a command and runs its collectives under this lock: the update runs in
        # a thread while the loop may serve the policy, and the ranks must agree on the order.
        self.lock = threading.RLock()

    # Commands ------------------------------------------------------------------------------

    def announce(self, command: Command, *args: Any) -> None:
        """Rank 0: send a command to the other ranks (tensors, in containers or TokenBatches,
        are copied to the CPU, here only); a no-op on them, which run the same code when they
        execute it."""
        if self.rank != 0:
            return
        args = tuple(batch_to(a, CPU) if isinstance(a, TokenBatch) else a for a in args)
        payload = tree_map_only(torch.Tensor, lambda t: t.detach().cpu(), (command, *args))
        dist.broadcast_object_list([payload], src=0, group=self.commands)

    @contextlib.contextmanager
    def leading(self, command: Command, *args: Any) -> Iterator[None]:
        """Rank 0 sends `command` and holds the group (its lock: the order of the ranks'
        collectives) while every rank runs it; a follower runs the same code (its announce is a
        no-op)."""
        with self.lock:
            self.announce(command, *args)
            yield

    def receive(self) -> tuple[Any, ...]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return tuple(box[0])

    def stop(self) -> None:
        """Rank 0, at the end of a run that ended well (done or cancelled: the rank exits 0, and
        torchrun waits for the others). A rank that fails sends nothing (its peers may wait in
        another collective): it exits non-zero and torchrun stops the group."""
        with self.lock:  # after any command an update thread is still sending
            self.announce(Command.STOP)
        self.close()

    # An update's share and reductions ----------------------------------------------------

    def share(self, count: int, padded: bool = False) -> list[int | None]:
        """This rank's micro-batches of `count`, round-robin (micro-batch i to rank i mod
        size); `padded`, with None up to the most any rank has: FSDP needs every rank to run as
        many forward (and backward) passes."""
        own: list[int | None] = list(range(self.rank, count, self.size))
        return own + [None] * (-(-count // self.size) - len(own)) if padded else own

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


def lead(
    group: ActorGroup | None, command: Command, *args: Any
) -> contextlib.AbstractContextManager[Any]:
    """`group.leading(command, *args)`; one process (None) just runs the code."""
    return contextlib.nullcontext() if group is None else group.leading(command, *args)


def share(group: ActorGroup | None, count: int, padded: bool = False) -> list[int | None]:
    """This rank's micro-batches of `count` (`ActorGroup.share`); one process's: all."""
    return list(range(count)) if group is None else group.share(count, padded)


@torch.no_grad()
def by_micro_batch(
    fns: list[Callable[[TokenBatch], torch.Tensor]],
    batch: TokenBatch,
    size: int,
    group: ActorGroup | None = None,
    padded: bool = False,
) -> list[torch.Tensor]:
    """Each of `fns` ((n, t) per micro-batch) over micro-batches of `size` sequences (0: all
    at once), padded to (N, T) fp32, no gradient. In a group each rank runs its micro-batches
    (`share`; `padded`: a rank short of them runs the last one again and drops it) and the
    parts are summed over the ranks: each rank's rows, zeros elsewhere, so every rank ends with
    the whole batch's, exactly as one process computes them."""
    n, width = len(batch), batch.mask.shape[1]
    size = size or n
    out = torch.zeros(len(fns), n, width, device=batch.mask.device)  # (K, N, T)
    count = -(-n // size)
    for index in share(group, count, padded):
        a = (count - 1 if index is None else index) * size
        micro = batch.rows(a, min(a + size, n))
        for k, fn in enumerate(fns):
            x = fn(micro).float()  # (n, t)
            if index is not None:
                out[k, a : a + x.shape[0], : x.shape[1]] = x
    if group is not None:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return list(out.unbind())


def read_saved(saved: Saved) -> Any:
    """A follower's copy of the resume state rank 0 read: the entry of its file, on the
    CPU (whatever device rank 0 saved from; loading moves it to this rank's)."""
    path, entry = saved
    return torch.load(path, map_location=CPU, weights_only=False)[entry]


def batch_to(batch: TokenBatch, device: torch.device) -> TokenBatch:
    """`batch` on `device`: the CPU to send it, this rank's device when received."""
    return dataclasses.replace(
        batch,
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        sampling_logp=batch.sampling_logp.to(device),
        mask=batch.mask.to(device),
    )


@dataclasses.dataclass(frozen=True)
class Follower:
    """What a follower rank's commands run on: its actor (`rl.actor.Actor`, `group` set) and
    PPO's learner (`rl.ppo_learner.PpoLearner`; None: GRPO)."""

    actor: Any
    learner: Any = None


def _update(f: Follower, batch: TokenBatch, advantages: torch.Tensor, objective: Any) -> None:
    f.actor.update(batch_to(batch, f.actor.device), advantages.to(f.actor.device), objective)


def _load(model: Any, path: Path, entry: str) -> None:
    model.load_state_dict(read_saved((path, entry)), (path, entry))


# What a follower does on each command but SETUP and STOP.
FOLLOWERS: dict[Command, Callable[..., None]] = {
    Command.UPDATE: _update,
    Command.LOAD: lambda f, path, entry: _load(f.actor, path, entry),
    Command.KL: lambda f, batch, estimator, size: f.actor.reference_kl(
        batch_to(batch, f.actor.device), estimator, size
    ),
    Command.GATHER: lambda f: f.actor.gather(),
    Command.SAVE: lambda f, name: f.actor.save_shards(name),
    Command.PPO_LEARN: lambda f, *args: f.learner.follow(f.actor, *args),
    Command.PPO_LOAD: lambda f, path, entry: _load(f.learner, path, entry),
    Command.CRITIC_SAVE: lambda f, name: f.learner.critic.save_shards(name),
}


def follow(follower: Follower, group: ActorGroup) -> None:
    """A follower rank's loop: rank 0's commands, in order, until STOP. An error ends the
    rank (non-zero: torchrun stops the group)."""
    while True:
        command, *args = group.receive()
        if command == Command.STOP:
            group.close()
            return
        FOLLOWERS[Command(command)](follower, *args)
