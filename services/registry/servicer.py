"""The registry's gRPC servicer: each handler converts the request, calls the domain core in a
worker thread, and converts the result back. Errors are raised, never set on the context."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2

from services.common.auth import current_team
from services.common.errors import FieldViolation, InvalidArgument, field_error
from services.common.pagination import decode_token, encode_token, page_size
from services.common.streams import consume_pipelined, produce_prefetched
from services.registry import convert
from services.registry.core import DATA_FILE, Registry
from services.registry.names import Collection, check_id
from services.registry.uploads import SHA256, StagedFiles, UploadIncomplete
from tlm.registry.v1 import registry_pb2 as pb
from tlm.registry.v1 import registry_pb2_grpc

T = TypeVar("T")
Ctx = grpc.aio.ServicerContext
DEFAULT_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024


async def _run(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def _chunk_size(requested: int) -> int:
    if requested < 0 or requested > MAX_CHUNK:
        raise InvalidArgument(
            f"chunk_size must be in [0, {MAX_CHUNK}]",
            violations=[FieldViolation("chunk_size", f"must be in [0, {MAX_CHUNK}]")],
        )
    return requested or DEFAULT_CHUNK


async def _header(requests: AsyncIterator[Any]) -> Any:
    """The header an upload stream must open with."""
    first = await anext(aiter(requests), None)
    if first is None or not first.HasField("header"):
        raise InvalidArgument(
            "the first message must carry the header",
            violations=[FieldViolation("header", "required in the first message")],
        )
    convert.check_enums(first.header, "header.")
    return first.header


def _check_file_header(header: pb.DatasetRevisionHeader) -> None:
    violations = []
    if header.size_bytes < 0:
        violations.append(FieldViolation("header.size_bytes", "must be >= 0"))
    if not SHA256.fullmatch(header.sha256):
        violations.append(FieldViolation("header.sha256", "must be 64 lowercase hex digits"))
    if violations:
        raise InvalidArgument(
            f"{violations[0].field}: {violations[0].description}", violations=violations
        )


def _row_batches(
    rows: Iterator[tuple[int, bytes]], batch_size: int
) -> Iterator[pb.ReadDatasetRowsResponse]:
    batch = pb.ReadDatasetRowsResponse()
    for index, line in rows:
        row = struct_pb2.Struct()
        row.update(json.loads(line))
        batch.rows.append(row)
        batch.row_indices.append(index)
        if len(batch.rows) >= batch_size:
            yield batch
            batch = pb.ReadDatasetRowsResponse()
    if batch.rows:
        yield batch


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.r = registry

    # Generic list helpers -------------------------------------------------------------------

    async def _list_resources(self, coll: Collection, request: Any, convert_fn: Callable) -> tuple:  # type: ignore[type-arg]
        query = {
            "c": coll.value,
            "p": request.name_prefix,
            "l": dict(request.labels),
            "k": getattr(request, "kind", 0),
        }
        size = page_size(request.page_size)
        after = decode_token(request.page_token, query)
        if after is not None and not isinstance(after, str):
            raise field_error("page_token", "not a token returned by this list method")
        rows = await _run(
            lambda: self.r.store.list_resources(
                current_team(),
                coll,
                after=after,
                limit=size,
                prefix=request.name_prefix,
                labels=dict(request.labels),
                dataset_kind=query["k"],
            )
        )
        token = encode_token(rows[size - 1].resource_id, query) if len(rows) > size else ""
        return [convert_fn(r) for r in rows[:size]], token

    async def _list_revisions(self, coll: Collection, request: Any, convert_fn: Callable) -> tuple:  # type: ignore[type-arg]
        from services.registry.names import parse_resource

        parent = parse_resource(request.parent, coll, "parent")
        size = page_size(request.page_size)
        before = decode_token(request.page_token, {"parent": request.parent})
        if before is not None and (not isinstance(before, int) or before < 1):
            raise field_error("page_token", "not a token returned by this list method")
        rows = await _run(
            lambda: self.r.store.list_revisions(
                current_team(), coll, parent.resource_id, before=before, limit=size
            )
        )
        token = (
            encode_token(rows[size - 1].seq, {"parent": request.parent}) if len(rows) > size else ""
        )
        return [convert_fn(r) for r in rows[:size]], token

    async def _download(
        self, key_sizes: list[tuple[str, str, int]], manifest: pb.Manifest, chunk: int
    ) -> AsyncIterator[pb.DownloadChunk]:
        yield pb.DownloadChunk(manifest=manifest)
        for path, key, _size in key_sizes:
            offset = 0
            async for block in produce_prefetched(self.r.read_blob(key, chunk)):
                yield pb.DownloadChunk(chunk=pb.FileChunk(path=path, offset=offset, data=block))
                offset += len(block)

    # Models ---------------------------------------------------------------------------------

    async def CreateModel(self, request: pb.CreateModelRequest, context: Ctx) -> pb.Model:
        check_id(request.model_id, "model_id")
        convert.check_enums(request)
        r = await _run(
            lambda: self.r.store.create_resource(
                current_team(),
                Collection.MODELS,
                request.model_id,
                request.description,
                dict(request.labels),
            )
        )
        return convert.model(r)

    async def GetModel(self, request: pb.GetModelRequest, context: Ctx) -> pb.Model:
        return convert.model(
            await _run(self.r.get_resource, current_team(), request.name, Collection.MODELS)
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Ctx
    ) -> pb.ListModelsResponse:
        items, token = await self._list_resources(Collection.MODELS, request, convert.model)
        return pb.ListModelsResponse(models=items, next_page_token=token)

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: Ctx
    ) -> pb.DeleteModelResponse:
        await _run(self.r.delete, current_team(), request.name, Collection.MODELS)
        return pb.DeleteModelResponse()

    async def UploadModelRevision(
        self, request_iterator: AsyncIterator[pb.UploadModelRevisionRequest], context: Ctx
    ) -> pb.ModelRevision:
        team = current_team()
        upload = await _run(self.r.begin_model_upload, team, await _header(request_iterator))

        def write(message: pb.UploadModelRevisionRequest) -> None:
            if not message.HasField("chunk"):
                raise InvalidArgument("only the first message may carry a header")
            upload.write(message.chunk)

        try:
            await consume_pipelined(request_iterator, write)
            revision = await _run(upload.finish)
        finally:
            await _run(upload.cleanup)
        return convert.model_revision(revision)

    async def GetModelRevision(
        self, request: pb.GetModelRevisionRequest, context: Ctx
    ) -> pb.ModelRevision:
        rev = await _run(self.r.get_revision, current_team(), request.name, Collection.MODELS)
        return convert.model_revision(rev)

    async def ListModelRevisions(
        self, request: pb.ListModelRevisionsRequest, context: Ctx
    ) -> pb.ListModelRevisionsResponse:
        items, token = await self._list_revisions(
            Collection.MODELS, request, convert.model_revision
        )
        return pb.ListModelRevisionsResponse(revisions=items, next_page_token=token)

    async def DownloadModelRevision(
        self, request: pb.DownloadModelRevisionRequest, context: Ctx
    ) -> AsyncIterator[pb.DownloadChunk]:
        chunk = _chunk_size(request.chunk_size)
        rev = convert.model_revision(
            await _run(self.r.get_revision, current_team(), request.name, Collection.MODELS)
        )
        files = [(f.path, f.sha256, f.size_bytes) for f in rev.manifest.files]
        async for message in self._download(files, rev.manifest, chunk):
            yield message

    async def SetModelAlias(self, request: pb.SetModelAliasRequest, context: Ctx) -> pb.Model:
        r = await _run(
            self.r.set_alias,
            current_team(),
            request.name,
            Collection.MODELS,
            request.alias,
            request.revision_id,
            request.etag,
        )
        return convert.model(r)

    async def UpdateModel(self, request: pb.UpdateModelRequest, context: Ctx) -> pb.Model:
        changes = convert.resource_changes(request.model, request.update_mask)
        r = await _run(
            self.r.update,
            current_team(),
            request.model.name,
            Collection.MODELS,
            changes,
            request.model.etag,
            "model.name",
        )
        return convert.model(r)

    # Datasets -------------------------------------------------------------------------------

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: Ctx) -> pb.Dataset:
        convert.check_enums(request)
        r = await _run(
            self.r.create_dataset,
            current_team(),
            request.dataset_id,
            request.kind,
            request.description,
            dict(request.labels),
        )
        return convert.dataset(r)

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Ctx) -> pb.Dataset:
        return convert.dataset(
            await _run(self.r.get_resource, current_team(), request.name, Collection.DATASETS)
        )

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Ctx
    ) -> pb.ListDatasetsResponse:
        items, token = await self._list_resources(Collection.DATASETS, request, convert.dataset)
        return pb.ListDatasetsResponse(datasets=items, next_page_token=token)

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: Ctx
    ) -> pb.DeleteDatasetResponse:
        await _run(self.r.delete, current_team(), request.name, Collection.DATASETS)
        return pb.DeleteDatasetResponse()

    async def UploadDatasetRevision(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRevisionRequest], context: Ctx
    ) -> pb.DatasetRevision:
        team = current_team()
        header = await _header(request_iterator)
        manifest = pb.Manifest(
            files=[
                pb.ArtifactFile(path=DATA_FILE, size_bytes=header.size_bytes, sha256=header.sha256)
            ]
        )
        await _run(self.r.check_dataset_header, team, header)  # before any bytes arrive
        _check_file_header(header)
        staged = StagedFiles(self.r.blobs.staging_dir(), manifest)
        received = [0]

        def write(message: pb.UploadDatasetRevisionRequest) -> None:
            if message.HasField("header"):
                raise InvalidArgument("only the first message may carry a header")
            staged.write(DATA_FILE, received[0], message.data)
            received[0] += len(message.data)

        try:
            await consume_pipelined(request_iterator, write)
            if received[0] == 0 and header.size_bytes == 0:
                raise InvalidArgument(
                    "the file is empty", violations=[FieldViolation("data", "empty file")]
                )
            folder = await _run(staged.finish)
            revision = await _run(self.r.upload_dataset, team, header, folder / DATA_FILE)
        except UploadIncomplete:
            raise
        finally:
            await _run(staged.cleanup)
        return convert.dataset_revision(revision)

    async def AppendDatasetRows(
        self, request: pb.AppendDatasetRowsRequest, context: Ctx
    ) -> pb.DatasetRevision:
        convert.check_enums(request)
        rows = [json_format.MessageToDict(r) for r in request.rows]
        rev = await _run(
            self.r.append_rows,
            current_team(),
            request.parent,
            request.kind,
            rows,
            request.request_id,
        )
        return convert.dataset_revision(rev)

    async def GetDatasetRevision(
        self, request: pb.GetDatasetRevisionRequest, context: Ctx
    ) -> pb.DatasetRevision:
        rev = await _run(self.r.get_revision, current_team(), request.name, Collection.DATASETS)
        return convert.dataset_revision(rev)

    async def ListDatasetRevisions(
        self, request: pb.ListDatasetRevisionsRequest, context: Ctx
    ) -> pb.ListDatasetRevisionsResponse:
        items, token = await self._list_revisions(
            Collection.DATASETS, request, convert.dataset_revision
        )
        return pb.ListDatasetRevisionsResponse(revisions=items, next_page_token=token)

    async def ReadDatasetRows(
        self, request: pb.ReadDatasetRowsRequest, context: Ctx
    ) -> AsyncIterator[pb.ReadDatasetRowsResponse]:
        batch_size = request.batch_size or 256
        if batch_size < 0:
            raise InvalidArgument(
                "batch_size must be >= 0",
                violations=[FieldViolation("batch_size", "must be >= 0")],
            )
        _rev, rows = await _run(self.r.read_rows, current_team(), request)
        # Reading, parsing and building batches happen in a worker thread, one batch ahead.
        async for batch in produce_prefetched(_row_batches(rows, batch_size)):
            yield batch

    async def DownloadDatasetRevision(
        self, request: pb.DownloadDatasetRevisionRequest, context: Ctx
    ) -> AsyncIterator[pb.DownloadChunk]:
        chunk = _chunk_size(request.chunk_size)
        rev = convert.dataset_revision(
            await _run(self.r.get_revision, current_team(), request.name, Collection.DATASETS)
        )
        entry = pb.ArtifactFile(path=DATA_FILE, size_bytes=rev.size_bytes, sha256=rev.sha256)
        manifest = pb.Manifest(files=[entry], total_bytes=rev.size_bytes)
        async for message in self._download(
            [(DATA_FILE, rev.sha256, rev.size_bytes)], manifest, chunk
        ):
            yield message

    async def SetDatasetAlias(self, request: pb.SetDatasetAliasRequest, context: Ctx) -> pb.Dataset:
        r = await _run(
            self.r.set_alias,
            current_team(),
            request.name,
            Collection.DATASETS,
            request.alias,
            request.revision_id,
            request.etag,
        )
        return convert.dataset(r)

    async def UpdateDataset(self, request: pb.UpdateDatasetRequest, context: Ctx) -> pb.Dataset:
        changes = convert.resource_changes(request.dataset, request.update_mask)
        r = await _run(
            self.r.update,
            current_team(),
            request.dataset.name,
            Collection.DATASETS,
            changes,
            request.dataset.etag,
            "dataset.name",
        )
        return convert.dataset(r)

    # Evaluators -----------------------------------------------------------------------------

    async def CreateEvaluator(
        self, request: pb.CreateEvaluatorRequest, context: Ctx
    ) -> pb.Evaluator:
        check_id(request.evaluator_id, "evaluator_id")
        convert.check_enums(request)
        r = await _run(
            lambda: self.r.store.create_resource(
                current_team(),
                Collection.EVALUATORS,
                request.evaluator_id,
                request.description,
                dict(request.labels),
            )
        )
        return convert.evaluator(r)

    async def GetEvaluator(self, request: pb.GetEvaluatorRequest, context: Ctx) -> pb.Evaluator:
        return convert.evaluator(
            await _run(self.r.get_resource, current_team(), request.name, Collection.EVALUATORS)
        )

    async def ListEvaluators(
        self, request: pb.ListEvaluatorsRequest, context: Ctx
    ) -> pb.ListEvaluatorsResponse:
        items, token = await self._list_resources(Collection.EVALUATORS, request, convert.evaluator)
        return pb.ListEvaluatorsResponse(evaluators=items, next_page_token=token)

    async def DeleteEvaluator(
        self, request: pb.DeleteEvaluatorRequest, context: Ctx
    ) -> pb.DeleteEvaluatorResponse:
        await _run(self.r.delete, current_team(), request.name, Collection.EVALUATORS)
        return pb.DeleteEvaluatorResponse()

    async def CreateEvaluatorRevision(
        self, request: pb.CreateEvaluatorRevisionRequest, context: Ctx
    ) -> pb.EvaluatorRevision:
        # No check_enums: the spec is the only part with enums, and the reward service's own
        # validation refuses unknown numbers there, with paths relative to the spec.
        rev = await _run(self.r.create_evaluator_revision, current_team(), request)
        return convert.evaluator_revision(rev)

    async def GetEvaluatorRevision(
        self, request: pb.GetEvaluatorRevisionRequest, context: Ctx
    ) -> pb.EvaluatorRevision:
        rev = await _run(self.r.get_revision, current_team(), request.name, Collection.EVALUATORS)
        return convert.evaluator_revision(rev)

    async def ListEvaluatorRevisions(
        self, request: pb.ListEvaluatorRevisionsRequest, context: Ctx
    ) -> pb.ListEvaluatorRevisionsResponse:
        items, token = await self._list_revisions(
            Collection.EVALUATORS, request, convert.evaluator_revision
        )
        return pb.ListEvaluatorRevisionsResponse(revisions=items, next_page_token=token)

    async def SetEvaluatorAlias(
        self, request: pb.SetEvaluatorAliasRequest, context: Ctx
    ) -> pb.Evaluator:
        r = await _run(
            self.r.set_alias,
            current_team(),
            request.name,
            Collection.EVALUATORS,
            request.alias,
            request.revision_id,
            request.etag,
        )
        return convert.evaluator(r)

    async def UpdateEvaluator(
        self, request: pb.UpdateEvaluatorRequest, context: Ctx
    ) -> pb.Evaluator:
        changes = convert.resource_changes(request.evaluator, request.update_mask)
        r = await _run(
            self.r.update,
            current_team(),
            request.evaluator.name,
            Collection.EVALUATORS,
            changes,
            request.evaluator.etag,
            "evaluator.name",
        )
        return convert.evaluator(r)
