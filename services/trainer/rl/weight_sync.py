"""Policy sync without a registry revision per step: the trainer pushes its weights straight to
every rollout replica (`RolloutService.PushWeights`), and the registry gets a revision only at
checkpoints (`save_every`), every `publish_every` steps and at the end.

Which replicas: the rollout address is resolved here to every replica behind it (an
`ipv4:a,b` list, or every address a DNS name resolves to, as the clients' round_robin policy
sees them) and each one gets every push, so whichever replica a Generate lands on holds the
version it names. A replica that joins later (autoscaling) or restarts answers Generate with
FAILED_PRECONDITION (WRONG_STATE); the controller then calls `serve`, which resolves the
address again and pushes to every replica. (Letting replicas pull lazily would need the
trainer to serve its weights; pushing keeps the trainer a client only.)

A pushed version is `jobs/{job}@step-{n}`: full weights are named in Generate's
`model_revision`, an adapter in its `adapter_revision` (on the base model).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from services.clients.rollout import RolloutClient
from services.rollout.convert import push_to_proto
from services.rollout.push import PushHeader, TensorPiece, policy_version, tensor_pieces
from services.trainer.rl.ports import PolicyRef
from tlm.rollout.v1 import rollout_pb2

log = structlog.get_logger()
Metadata = tuple[tuple[str, str], ...]
DEFAULT_PORT = 443  # what gRPC assumes for a DNS name without a port
CPU_DEVICE = torch.device("cpu")


def replica_addresses(address: str) -> list[str]:
    """Every replica behind a gRPC target: `ipv4:a:p,b:p` and `ipv6:[a]:p,...` lists, `dns:`
    names (each resolved address), plain `host:port`; a `unix:` socket is one replica."""
    scheme, _, rest = address.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return [a for a in rest.split(",") if a]
    if scheme == "unix" or scheme == "unix-abstract":
        return [address]
    target = address
    if scheme == "dns":
        target = rest.lstrip("/").split("/", 1)[-1] if rest.startswith("//") else rest
    host, port = _split(target)
    try:
        ipaddress.ip_address(host)
        return [_join(host, port)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({_join(str(info[4][0]), port) for info in infos})


def _split(target: str) -> tuple[str, int]:
    if target.startswith("["):  # [v6]:port
        host, _, port = target[1:].partition("]:")
        return host, int(port or DEFAULT_PORT)
    host, _, port = target.rpartition(":")
    return (host, int(port)) if host else (target, DEFAULT_PORT)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Payload:
    """What one push carries: the header and the tensors, by name, on the CPU (copied from the
    device once, however many replicas each push goes to)."""

    header: PushHeader
    tensors: dict[str, torch.Tensor]

    def messages(self) -> Iterator[rollout_pb2.PushWeightsRequest]:
        pieces: Iterator[TensorPiece] = (
            piece for name, t in self.tensors.items() for piece in tensor_pieces(name, t)
        )
        return push_to_proto(self.header, pieces)


def actor_payload(
    model: Any,
    lora: bool,
    policy: str,
    step: int,
    base_model: str,
    state: dict[str, torch.Tensor] | None = None,
    copy: bool = False,
) -> Payload:
    """The actor's weights as a push: the LoRA tensors and adapter config (as peft saves them),
    or every tensor of the full state dict (shared tensors once, by their first name). `state`:
    the weights of a sharded model, gathered (`Actor.gathered`), in place of its own. `copy`:
    tensors of their own even where the model's are on the CPU already (else the live ones)."""
    if lora:
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model, state_dict=state)
        config = model.peft_config["default"].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        config_json = json.dumps(config, default=str)
    else:
        seen: set[int] = set()
        tensors = {}
        for name, tensor in (model.state_dict() if state is None else state).items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                tensors[name] = tensor
        config_json = ""
    header = PushHeader(policy, step, base_model, lora, config_json, len(tensors))
    return Payload(header, {k: v.detach().to(CPU_DEVICE, copy=copy) for k, v in tensors.items()})


class WeightPusher:
    """PushWeights to every replica behind the rollout address: one rollout client each."""

    def __init__(self, address: str, metadata: Metadata) -> None:
        self.address, self.metadata = address, metadata
        self._clients: dict[str, RolloutClient] = {}
        self._closing: set[asyncio.Future[None]] = set()

    def replicas(self, refresh: bool = False) -> list[RolloutClient]:
        """A client per replica; `refresh` resolves the address again (replicas come and go:
        a client of one no longer there is dropped, its channel closed in the background)."""
        if refresh or not self._clients:
            now = replica_addresses(self.address)
            for gone in set(self._clients) - set(now):
                self._closing.add(asyncio.ensure_future(self._clients.pop(gone).close()))
            for replica in now:
                if replica not in self._clients:
                    self._clients[replica] = RolloutClient(replica, metadata=self.metadata)
        return list(self._clients.values())

    async def push(self, payload: Payload, refresh: bool = False) -> str:
        """Push to every replica at once; returns the version they serve."""
        replies = await asyncio.gather(
            *(c.push_weights(payload.messages()) for c in self.replicas(refresh))
        )
        return str(replies[0].policy_version)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        await asyncio.gather(*self._closing)
        self._clients, self._closing = {}, set()


class PushPublisher:
    """The PolicyPublisher of online jobs: a push to the replicas at each sync, a registry
    revision (by `upload`) at the steps `registry_step` says, warmed up on every replica.

    `keep_pushed` (the actor trains on while a push is served: one step ahead, max_policy_lag
    1, or several steps per publication, sync_every > 1): the last push's weights are kept, as
    a copy, until the next publication, so that a replica that lost them gets those weights
    again and not the actor's newer ones under the old name. It costs a host copy of what is
    pushed (the whole model with full tuning, the adapters with LoRA). Otherwise the actor has
    not moved since its last publication and is pushed as it is."""

    def __init__(
        self,
        pusher: WeightPusher,
        upload: Callable[[Path, str], Awaitable[str]],
        weights: Callable[[str, int, bool], Payload],
        base_model: str,
        lora: bool,
        job_id: str,
        registry_step: Callable[[int], bool],
        keep_pushed: bool = False,
    ) -> None:
        """`weights(policy, step, copy)`: the push of the actor's weights (`actor_payload`)."""
        self.pusher, self.upload, self.weights = pusher, upload, weights
        self.base_model, self.lora, self.job_id = base_model, lora, job_id
        self.registry_step = registry_step
        self.policy = f"jobs/{job_id}"
        self.keep_pushed = keep_pushed
        self._pushed: Payload | None = None  # the last push, kept (`keep_pushed`)

    @classmethod
    def for_job(
        cls,
        pusher: WeightPusher,
        upload: Callable[[Path, str], Awaitable[str]],
        model: Any,
        spec: Any,  # a JobSpec of an online method (GRPO, PPO: `publish_every`)
        job_id: str,
        total_steps: int,
        gathered: Callable[[], dict[str, torch.Tensor]] | None = None,
        keep_pushed: bool = False,
    ) -> PushPublisher:
        """`gathered`: a sharded model's weights, gathered to this rank (`Actor.gathered`);
        `keep_pushed`: see the class (`ControllerConfig.trains_while_served`)."""
        lora = spec.lora is not None
        base = spec.base_model

        def weights(policy: str, step: int, copy: bool) -> Payload:
            if gathered is not None:  # a gathered version is never changed in place
                return actor_payload(model, lora, policy, step, base, gathered())
            return actor_payload(model, lora, policy, step, base, copy=copy)

        steps = registry_steps(spec.params.publish_every, spec.training.save_every, total_steps)
        return cls(pusher, upload, weights, base, lora, job_id, steps, keep_pushed=keep_pushed)

    async def serve(self, policy: PolicyRef | None) -> PolicyRef:
        """The base or a registry revision: warm it up on every replica. A pushed version (the
        sampler lost it): push its weights again (kept, or the actor's, which have not changed
        since), to every replica now resolved; taken in a thread (a sharded actor's gather)."""
        if policy is not None and policy.step and policy.version.startswith(self.policy + "@"):
            payload = self._pushed
            if payload is None or payload.header.step != policy.step:
                payload = await asyncio.to_thread(self.weights, self.policy, policy.step, False)
            await self.pusher.push(payload, refresh=True)
            return policy
        if policy is None or not policy.step:
            await self._warm(self.base_model, lora=False, refresh=True)
            return PolicyRef(self.base_model)
        await self._warm(policy.version, self.lora, refresh=True)
        return policy

    async def publish(self, folder: Path, step: int) -> PolicyRef:
        self._pushed = None
        if not self.registry_step(step):
            payload = await asyncio.to_thread(self.weights, self.policy, step, self.keep_pushed)
            version = await self.pusher.push(payload)
            assert version == policy_version(self.policy, step), version
            if self.keep_pushed:
                self._pushed = payload
            return PolicyRef(version, adapter=version if self.lora else "", step=step)
        revision = await self.upload(folder, f"{self.job_id}-step-{step}")
        await self._warm(revision, self.lora)
        return PolicyRef(revision, adapter=revision if self.lora else "", step=step)

    async def _warm(self, revision: str, lora: bool, refresh: bool = False) -> None:
        """On every replica: LoadModel (full weights; also the team's default model there) or
        LoadAdapter. Not needed for serving (a request loads what it names), but the first
        Generate then finds the weights ready."""
        replicas = self.pusher.replicas(refresh)
        model = self.base_model if lora else revision
        await asyncio.gather(*(c.load_model(model) for c in replicas))  # a restarted one too
        if lora:
            await asyncio.gather(*(c.load_adapter(revision) for c in replicas))


def registry_steps(publish_every: int, save_every: int, total_steps: int) -> Callable[[int], bool]:
    """Which steps' policies become registry revisions: every `publish_every` (0: none but),
    every checkpoint (a resume must find its policy in the registry) and the last."""

    def is_registry_step(step: int) -> bool:
        return (
            step == total_steps
            or (publish_every > 0 and step % publish_every == 0)
            or (save_every > 0 and step % save_every == 0)
        )

    return is_registry_step
