"""Where weights come from: the WeightSource interface, and an in-memory source for tests.

The service fetches revisions from the registry (`registry_weights.RegistryWeights`); tests and
local runs may serve folders registered by name (`LocalWeights`). Both pass the same core tests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.errors import NotFound


class WeightFormat(enum.Enum):
    FULL = "full"  # a Hugging Face model folder
    LORA = "lora"  # a PEFT LoRA adapter folder on a base revision


@dataclass(frozen=True)
class ResolvedRevision:
    name: str  # the resolved revision name, "models/{m}/revisions/{id}": the policy version
    format: WeightFormat
    path: Path  # a local folder with its files
    base_model_revision: str = ""  # for adapters: lineage.base_model_revision
    # What the files hold (registry.client.manifest_digest): a deleted model's name comes
    # back with other weights, so "already loaded?" compares this too. "" when unknown.
    digest: str = ""


class RevisionNotFound(NotFound):
    """The name resolves to no revision (or one of another team)."""


class WeightSource(Protocol):
    async def fetch(self, name: str, team: str) -> ResolvedRevision:
        """Resolve aliases and return a local copy; RevisionNotFound if there is none."""

    async def resolve(self, name: str, team: str) -> str:
        """The resolved revision name for `name` (an alias or a revision)."""


class LocalWeights:
    """Folders registered by revision name, aliases included (tests, local experiments)."""

    def __init__(self) -> None:
        self._revisions: dict[str, ResolvedRevision] = {}
        self._aliases: dict[str, str] = {}

    def add(self, revision: ResolvedRevision, *aliases: str) -> None:
        self._revisions[revision.name] = revision
        for alias in aliases:
            self._aliases[alias] = revision.name

    async def resolve(self, name: str, team: str) -> str:
        resolved = self._aliases.get(name, name)
        if resolved not in self._revisions:
            raise RevisionNotFound(f"{name} does not exist")
        return resolved

    async def fetch(self, name: str, team: str) -> ResolvedRevision:
        return self._revisions[await self.resolve(name, team)]
