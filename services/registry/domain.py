"""The registry's domain types: what the core takes and returns. No grpc here, and no stored JSON
read by key: a revision's facts are its typed revision message (`ModelRevision`,
`DatasetRevision`, `EvaluatorRevision`, as the contract defines them), parsed once by the store.
`convert.py` builds the request types from protobuf requests and the responses from these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from services.common.errors import Aborted, NotFound
from services.specs.names import LATEST, Collection, revision_id
from tlm.registry.v1 import registry_pb2

T = TypeVar("T")
RevisionBody = (
    registry_pb2.ModelRevision | registry_pb2.DatasetRevision | registry_pb2.EvaluatorRevision
)
# The message a collection's revisions are stored as.
BODY_TYPES: Mapping[Collection, type[RevisionBody]] = {
    Collection.MODELS: registry_pb2.ModelRevision,
    Collection.DATASETS: registry_pb2.DatasetRevision,
    Collection.EVALUATORS: registry_pb2.EvaluatorRevision,
}


@dataclass(frozen=True)
class Resource:
    team: str
    collection: Collection
    resource_id: str
    description: str
    labels: dict[str, str]
    dataset_kind: int
    aliases: dict[str, str]
    etag: str
    latest_revision_id: str
    create_time: datetime
    update_time: datetime

    @property
    def name(self) -> str:
        return f"{self.collection}/{self.resource_id}"


@dataclass(frozen=True)
class Revision:
    parent: Resource
    seq: int
    request_id: str
    body: RevisionBody  # the revision's facts; name, id, time and aliases are the fields here
    blobs: list[str]
    create_time: datetime
    aliases: list[str] = field(default_factory=list)

    @property
    def revision_id(self) -> str:
        return revision_id(self.seq)

    @property
    def name(self) -> str:
        return f"{self.parent.name}/revisions/{self.revision_id}"


def revision_aliases(parent: Resource, seq: int) -> list[str]:
    """The aliases naming revision `seq`: "latest" first, then the user's, sorted."""
    rid = revision_id(seq)
    aliases = [a for a, r in sorted(parent.aliases.items()) if r == rid]
    if parent.latest_revision_id == rid:
        aliases.insert(0, LATEST)
    return aliases


@dataclass(frozen=True)
class ResourceChanges:
    """What an Update method changes; None leaves a field as it is. `labels` replaces them all."""

    description: str | None = None
    labels: dict[str, str] | None = None


@dataclass(frozen=True)
class ResourceQuery:
    """A List method's filters and page: resources by id, after the page token's."""

    prefix: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    dataset_kind: int = 0
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class RevisionQuery:
    """A ListRevisions page: newest first, before the page token's revision."""

    parent: str
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str = ""


@dataclass(frozen=True)
class NewResource:
    resource_id: str
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    dataset_kind: int = 0


@dataclass(frozen=True)
class DatasetHeader:
    """What a dataset upload declares before its bytes."""

    parent: str
    kind: int = 0
    format: int = 0
    size_bytes: int = 0
    sha256: str = ""
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class ModelHeader:
    """What a model upload declares before its bytes. The manifest and lineage are the
    contract's own messages: they are stored in the revision as they are (aliases resolved)."""

    parent: str
    format: int = 0
    manifest: registry_pb2.Manifest = field(default_factory=registry_pb2.Manifest)
    lineage: registry_pb2.Lineage = field(default_factory=registry_pb2.Lineage)
    description: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class RowQuery:
    """Which rows of a dataset revision a reader gets: a shard, a window, maybe shuffled."""

    name: str
    shard_index: int = 0
    shard_count: int = 0  # 0 means 1
    offset: int = 0
    limit: int = 0  # 0: to the end
    shuffle: bool = False
    shuffle_seed: int = 0


@dataclass(frozen=True)
class EvaluatorDraft:
    """A new evaluator revision: the spec as JSON text (from `spec` or `spec_json`)."""

    parent: str
    spec_json: str
    description: str = ""
    request_id: str = ""


class StaleBase(Aborted):
    """A revision built on the newest one lost a race with another writer; rebuild and retry."""


class BaseRevisionGone(NotFound):
    """The revision a new one names as its base was deleted before the new one was stored."""
