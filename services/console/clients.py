"""The service clients the console calls, one set per caller's API key: the key the browser
signed in with is the key the services see, so a team sees exactly what its key allows."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from services.clients import DeployClient, RegistryClient, RewardClient, TrainerClient

# Sets of clients kept open (one channel per service each); the least recently used goes.
MAX_KEYS = 32
# An evicted set may still serve a request in flight: it is closed this much later.
CLOSE_AFTER_S = 60.0
TIMEOUT_S = 30.0  # default deadline of a console call (watching a job has none)


@dataclass
class Clients:
    registry: RegistryClient
    reward: RewardClient
    trainer: TrainerClient
    deploy: DeployClient

    @classmethod
    def open(cls, address: str | None, key: str | None) -> Clients:
        """Clients of the services at `address` (None: TLM_<SERVICE>_ADDRESS, TLM_ADDRESS).
        Without a key they send none (never the server's own TLM_API_KEY)."""
        kw: dict[str, object] = {"timeout_s": TIMEOUT_S}
        kw.update({"api_key": key} if key else {"metadata": ()})
        return cls(
            RegistryClient(address, **kw),  # type: ignore[arg-type]
            RewardClient(address, **kw),  # type: ignore[arg-type]
            TrainerClient(address, **kw),  # type: ignore[arg-type]
            DeployClient(address, **kw),  # type: ignore[arg-type]
        )

    async def close(self) -> None:
        for c in (self.registry, self.reward, self.trainer, self.deploy):
            await c.close()


class ClientPool:
    """`for_key(key)`: the clients for a caller's key, opened on first use."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sets: OrderedDict[str, Clients] = OrderedDict()

    def for_key(self, key: str | None) -> Clients:
        slot = key or ""
        found = self._sets.get(slot)
        if found is None:
            found = self._sets[slot] = Clients.open(self.address, key)
            if len(self._sets) > MAX_KEYS:
                _, old = self._sets.popitem(last=False)
                asyncio.get_running_loop().call_later(
                    CLOSE_AFTER_S, lambda: asyncio.ensure_future(old.close())
                )
        self._sets.move_to_end(slot)
        return found

    async def close(self) -> None:
        for clients in self._sets.values():
            await clients.close()
        self._sets.clear()
