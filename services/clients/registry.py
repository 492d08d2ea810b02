"""The registry client other services (reward, rollout, trainer), the CLI and tests use.

Calls carry the caller's team: services pass a service API key and the team they act for.
Errors are domain errors (services/clients/errors.py). Downloads verify every file's sha256
(services/clients/artifacts.py). Collection-wide calls (get, list, alias, update, delete) take
the collection ("models", "datasets", "evaluators") and dispatch through one table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import field_mask_pb2

from services.clients.artifacts import (
    CHUNK,
    folder_manifest,
    from_struct,
    hashed_blocks,
    keep_transfer_buffers,
    read_blocks,
    sha256_file,
    to_struct,
    write_download,
)
from services.clients.base import ServiceClient
from services.common.errors import AlreadyExists
from services.common.pagination import MAX_PAGE_SIZE
from services.common.streams import produce_prefetched
from tlm.registry.v1 import registry_pb2, registry_pb2_grpc

PAGE_SIZE = MAX_PAGE_SIZE  # per List call; the lists follow next_page_token to the end


@dataclass(frozen=True)
class Collection:
    """A collection's resource type: `Model` names GetModel, ListModels, SetModelAlias, ..."""

    noun: str  # "Model"
    field: str  # the resource's field in its Update request: "model"

    def request(self, verb: str, suffix: str = "", **fields: Any) -> Any:
        return getattr(registry_pb2, f"{verb}{self.noun}{suffix}Request")(**fields)

    def rpc(self, stub: Any, verb: str, suffix: str = "") -> Any:
        return getattr(stub, f"{verb}{self.noun}{suffix}")


COLLECTIONS = {
    "models": Collection("Model", "model"),
    "datasets": Collection("Dataset", "dataset"),
    "evaluators": Collection("Evaluator", "evaluator"),
}


class RegistryClient(ServiceClient):
    """Async client of the RegistryService; one channel, reused."""

    service = "registry"
    descriptor = registry_pb2.DESCRIPTOR
    stub_class = registry_pb2_grpc.RegistryServiceStub

    # Any collection ------------------------------------------------------------------------

    async def get(self, collection: str, name: str, team: str | None = None) -> Any:
        """The Model, Dataset or Evaluator `{collection}/{id}`."""
        c = COLLECTIONS[collection]
        return await self._call(c.rpc(self.stub, "Get"), c.request("Get", name=name), team)

    async def get_revision(self, collection: str, name: str, team: str | None = None) -> Any:
        """A revision by full name; its alias (`latest`, `prod`) resolves to an id."""
        c = COLLECTIONS[collection]
        request = c.request("Get", "Revision", name=name)
        return await self._call(c.rpc(self.stub, "Get", "Revision"), request, team)

    async def list_resources(
        self, collection: str, team: str | None = None, page_size: int = PAGE_SIZE, **filters: Any
    ) -> list[Any]:
        """Every resource of a collection, page after page; `filters` are request fields."""
        c = COLLECTIONS[collection]
        request = c.request("List", "s", page_size=page_size, **filters)
        return await self._every_page(c.rpc(self.stub, "List", "s"), request, collection, team)

    async def list_revisions(
        self, collection: str, parent: str, team: str | None = None, page_size: int = PAGE_SIZE
    ) -> list[Any]:
        c = COLLECTIONS[collection]
        request = c.request("List", "Revisions", parent=parent, page_size=page_size)
        rpc = c.rpc(self.stub, "List", "Revisions")
        return await self._every_page(rpc, request, "revisions", team)

    async def set_alias(
        self,
        collection: str,
        name: str,
        alias: str,
        revision_id: str,
        etag: str = "",
        team: str | None = None,
    ) -> Any:
        """Point `alias` at `revision_id` ("" removes it); with `etag`, only if unchanged."""
        c = COLLECTIONS[collection]
        request = c.request(
            "Set", "Alias", name=name, alias=alias, revision_id=revision_id, etag=etag
        )
        return await self._call(c.rpc(self.stub, "Set", "Alias"), request, team)

    async def update(
        self,
        collection: str,
        name: str,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        etag: str = "",
        team: str | None = None,
    ) -> Any:
        """Change the description and/or replace the labels; the mask names what is given."""
        c = COLLECTIONS[collection]
        resource = getattr(registry_pb2, c.noun)(name=name, etag=etag)
        paths: list[str] = []
        if description is not None:
            resource.description, paths = description, [*paths, "description"]
        if labels is not None:
            resource.labels.update(labels)
            paths.append("labels")
        mask = field_mask_pb2.FieldMask(paths=paths)
        request = c.request("Update", **{c.field: resource, "update_mask": mask})
        return await self._call(c.rpc(self.stub, "Update"), request, team)

    async def delete(self, collection: str, name: str, team: str | None = None) -> Any:
        c = COLLECTIONS[collection]
        return await self._call(c.rpc(self.stub, "Delete"), c.request("Delete", name=name), team)

    # Models -------------------------------------------------------------------------------

    async def create_model(
        self, model_id: str, description: str = "", team: str | None = None, exist_ok: bool = False
    ) -> registry_pb2.Model | None:
        """Create `models/{model_id}`; with `exist_ok`, one that exists is fine (None)."""
        request = registry_pb2.CreateModelRequest(model_id=model_id, description=description)
        try:
            return await self._call(self.stub.CreateModel, request, team)
        except AlreadyExists:
            if not exist_ok:
                raise
            return None

    async def get_model_revision(
        self, name: str, team: str | None = None
    ) -> registry_pb2.ModelRevision:
        request = registry_pb2.GetModelRevisionRequest(name=name)
        return await self._call(self.stub.GetModelRevision, request, team)

    async def upload_model_revision(
        self,
        parent: str,
        folder: Path,
        *,
        format: int = registry_pb2.MODEL_FORMAT_FULL_WEIGHTS,
        lineage: registry_pb2.Lineage | None = None,
        request_id: str = "",
        description: str = "",
        labels: Mapping[str, str] | None = None,
        team: str | None = None,
    ) -> registry_pb2.ModelRevision:
        """Upload `folder` as a new revision of `parent`. Each file is read once: its sha256 is
        computed while its blocks are sent, and travels on its last chunk (the manifest leaves
        it empty); the service checks it before storing anything."""
        keep_transfer_buffers()
        manifest = folder_manifest(folder, digests=False)
        header = registry_pb2.ModelRevisionHeader(
            parent=parent,
            request_id=request_id,
            format=format,  # type: ignore[arg-type]
            lineage=lineage,
            manifest=manifest,
            description=description,
            labels=dict(labels or {}),
        )

        async def requests() -> AsyncIterator[registry_pb2.UploadModelRevisionRequest]:
            yield registry_pb2.UploadModelRevisionRequest(header=header)
            for entry in manifest.files:
                offset = 0
                blocks = hashed_blocks(folder / entry.path, entry.size_bytes)
                async for block, sha256 in produce_prefetched(blocks):
                    # Filled in place: UploadModelRevisionRequest(chunk=FileChunk(...)) copies
                    # the block a second time.
                    request = registry_pb2.UploadModelRevisionRequest()
                    request.chunk.path, request.chunk.offset = entry.path, offset
                    request.chunk.data, request.chunk.sha256 = block, sha256
                    yield request
                    offset += len(block)

        return await self._call(self.stub.UploadModelRevision, requests(), team)

    def download_model_chunks(
        self, name: str, team: str | None = None
    ) -> AsyncIterator[registry_pb2.DownloadChunk]:
        """The raw download stream (manifest, then chunks); stop early to abandon it."""
        request = registry_pb2.DownloadModelRevisionRequest(name=name, chunk_size=CHUNK)
        return self._stream(self.stub.DownloadModelRevision, request, team)

    async def download_model_revision(
        self, name: str, dest: Path, team: str | None = None
    ) -> registry_pb2.Manifest:
        """Write the revision's files under `dest`, verifying sizes and sha256."""
        return await write_download(self.download_model_chunks(name, team), dest)

    # Datasets -----------------------------------------------------------------------------

    async def get_dataset_revision(
        self, name: str, team: str | None = None
    ) -> registry_pb2.DatasetRevision:
        request = registry_pb2.GetDatasetRevisionRequest(name=name)
        return await self._call(self.stub.GetDatasetRevision, request, team)

    async def upload_dataset_file(
        self,
        parent: str,
        path: Path,
        kind: int,
        *,
        format: int = registry_pb2.DATASET_FORMAT_JSONL,
        request_id: str = "",
        description: str = "",
        team: str | None = None,
    ) -> registry_pb2.DatasetRevision:
        keep_transfer_buffers()
        header = registry_pb2.DatasetRevisionHeader(
            parent=parent,
            request_id=request_id,
            kind=kind,  # type: ignore[arg-type]
            format=format,  # type: ignore[arg-type]
            size_bytes=path.stat().st_size,
            sha256=sha256_file(path),
            description=description,
        )

        async def requests() -> AsyncIterator[registry_pb2.UploadDatasetRevisionRequest]:
            yield registry_pb2.UploadDatasetRevisionRequest(header=header)
            async for block in produce_prefetched(read_blocks(path)):
                yield registry_pb2.UploadDatasetRevisionRequest(data=block)

        return await self._call(self.stub.UploadDatasetRevision, requests(), team)

    async def append_dataset_rows(
        self,
        parent: str,
        kind: int,
        rows: Iterable[Mapping[str, Any]],
        request_id: str = "",
        team: str | None = None,
    ) -> registry_pb2.DatasetRevision:
        request = registry_pb2.AppendDatasetRowsRequest(
            parent=parent,
            kind=kind,  # type: ignore[arg-type]
            rows=[to_struct(r) for r in rows],
            request_id=request_id,
        )
        return await self._call(self.stub.AppendDatasetRows, request, team)

    async def read_dataset_rows(
        self, name: str, team: str | None = None, **options: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Rows of a revision as dicts; options are ReadDatasetRowsRequest fields."""
        request = registry_pb2.ReadDatasetRowsRequest(name=name, **options)
        async for batch in self._stream(self.stub.ReadDatasetRows, request, team):
            for row in batch.rows:
                yield from_struct(row)

    # Evaluators ---------------------------------------------------------------------------

    async def get_evaluator_revision(
        self, name: str, team: str | None = None
    ) -> registry_pb2.EvaluatorRevision:
        request = registry_pb2.GetEvaluatorRevisionRequest(name=name)
        return await self._call(self.stub.GetEvaluatorRevision, request, team)

    async def create_evaluator_revision(
        self, parent: str, spec_json: str, request_id: str = "", team: str | None = None
    ) -> registry_pb2.EvaluatorRevision:
        request = registry_pb2.CreateEvaluatorRevisionRequest(
            parent=parent, spec_json=spec_json, request_id=request_id
        )
        return await self._call(self.stub.CreateEvaluatorRevision, request, team)
