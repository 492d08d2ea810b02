"""The registry's gRPC servicer: each handler converts the request (`convert`), calls the domain
core in a worker thread, and converts the result back. Errors are raised, never set on the
context. It never reaches the store, the staging folder or page tokens itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from services.common.auth import current_team
from services.common.errors import FieldViolation, InvalidArgument
from services.common.streams import consume_pipelined, produce_prefetched
from services.registry import convert
from services.registry.core import DATA_FILE, Registry
from services.registry.domain import Page
from services.specs.names import Collection
from tlm.registry.v1 import registry_pb2 as pb
from tlm.registry.v1 import registry_pb2_grpc

T = TypeVar("T")
Ctx = grpc.aio.ServicerContext
DEFAULT_CHUNK = 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
MODELS, DATASETS, EVALUATORS = Collection.MODELS, Collection.DATASETS, Collection.EVALUATORS


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
    return first.header


def _items(page: Page[Any], convert_fn: Callable[[Any], T]) -> list[T]:
    return [convert_fn(item) for item in page.items]


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def _download(
        self, key_sizes: list[tuple[str, str]], manifest: pb.Manifest, chunk: int
    ) -> AsyncIterator[pb.DownloadChunk]:
        yield pb.DownloadChunk(manifest=manifest)
        for path, key in key_sizes:
            offset = 0
            async for block in produce_prefetched(self.r.read_blob(key, chunk)):
                # Filled in place: DownloadChunk(chunk=FileChunk(...)) copies the block twice.
                message = pb.DownloadChunk()
                message.chunk.path, message.chunk.offset = path, offset
                message.chunk.data = block
                yield message
                offset += len(block)

    async def _upload(
        self, upload: Any, requests: AsyncIterator[Any], write: Callable[[Any], None]
    ) -> Any:
        """Stage every chunk after the header through `upload`, then store the revision."""
        try:
            await consume_pipelined(requests, write)
            return await _run(upload.finish)
        finally:
            await _run(upload.cleanup)

    # Models ---------------------------------------------------------------------------------

    async def CreateModel(self, request: pb.CreateModelRequest, context: Ctx) -> pb.Model:
        new = convert.new_resource(request.model_id, request)
        return convert.model(await _run(self.r.create_resource, current_team(), MODELS, new))

    async def GetModel(self, request: pb.GetModelRequest, context: Ctx) -> pb.Model:
        return convert.model(await _run(self.r.get_resource, current_team(), request.name, MODELS))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Ctx
    ) -> pb.ListModelsResponse:
        query = convert.resource_query(request)
        page = await _run(self.r.list_resources, current_team(), MODELS, query)
        return pb.ListModelsResponse(
            models=_items(page, convert.model), next_page_token=page.next_page_token
        )

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: Ctx
    ) -> pb.DeleteModelResponse:
        await _run(self.r.delete, current_team(), request.name, MODELS)
        return pb.DeleteModelResponse()

    async def UploadModelRevision(
        self, request_iterator: AsyncIterator[pb.UploadModelRevisionRequest], context: Ctx
    ) -> pb.ModelRevision:
        header = convert.model_header(await _header(request_iterator))
        upload = await _run(self.r.begin_model_upload, current_team(), header)

        def write(message: pb.UploadModelRevisionRequest) -> None:
            if not message.HasField("chunk"):
                raise InvalidArgument("only the first message may carry a header")
            upload.write(message.chunk)

        return convert.model_revision(await self._upload(upload, request_iterator, write))

    async def GetModelRevision(
        self, request: pb.GetModelRevisionRequest, context: Ctx
    ) -> pb.ModelRevision:
        rev = await _run(self.r.get_revision, current_team(), request.name, MODELS)
        return convert.model_revision(rev)

    async def ListModelRevisions(
        self, request: pb.ListModelRevisionsRequest, context: Ctx
    ) -> pb.ListModelRevisionsResponse:
        query = convert.revision_query(request)
        page = await _run(self.r.list_revisions, current_team(), MODELS, query)
        return pb.ListModelRevisionsResponse(
            revisions=_items(page, convert.model_revision), next_page_token=page.next_page_token
        )

    async def DownloadModelRevision(
        self, request: pb.DownloadModelRevisionRequest, context: Ctx
    ) -> AsyncIterator[pb.DownloadChunk]:
        chunk = _chunk_size(request.chunk_size)
        rev = convert.model_revision(
            await _run(self.r.get_revision, current_team(), request.name, MODELS)
        )
        files = [(f.path, f.sha256) for f in rev.manifest.files]
        async for message in self._download(files, rev.manifest, chunk):
            yield message

    async def SetModelAlias(self, request: pb.SetModelAliasRequest, context: Ctx) -> pb.Model:
        r = await _run(
            self.r.set_alias,
            current_team(),
            request.name,
            MODELS,
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
            MODELS,
            changes,
            request.model.etag,
            "model.name",
        )
        return convert.model(r)

    # Datasets -------------------------------------------------------------------------------

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: Ctx) -> pb.Dataset:
        new = convert.new_resource(request.dataset_id, request)
        return convert.dataset(await _run(self.r.create_resource, current_team(), DATASETS, new))

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Ctx) -> pb.Dataset:
        return convert.dataset(
            await _run(self.r.get_resource, current_team(), request.name, DATASETS)
        )

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: Ctx
    ) -> pb.ListDatasetsResponse:
        query = convert.resource_query(request)
        page = await _run(self.r.list_resources, current_team(), DATASETS, query)
        return pb.ListDatasetsResponse(
            datasets=_items(page, convert.dataset), next_page_token=page.next_page_token
        )

    async def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: Ctx
    ) -> pb.DeleteDatasetResponse:
        await _run(self.r.delete, current_team(), request.name, DATASETS)
        return pb.DeleteDatasetResponse()

    async def UploadDatasetRevision(
        self, request_iterator: AsyncIterator[pb.UploadDatasetRevisionRequest], context: Ctx
    ) -> pb.DatasetRevision:
        header = convert.dataset_header(await _header(request_iterator))
        upload = await _run(self.r.begin_dataset_upload, current_team(), header)

        def write(message: pb.UploadDatasetRevisionRequest) -> None:
            if message.HasField("header"):
                raise InvalidArgument("only the first message may carry a header")
            upload.write(message.data)

        return convert.dataset_revision(await self._upload(upload, request_iterator, write))

    async def AppendDatasetRows(
        self, request: pb.AppendDatasetRowsRequest, context: Ctx
    ) -> pb.DatasetRevision:
        rows = convert.appended_rows(request)
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
        rev = await _run(self.r.get_revision, current_team(), request.name, DATASETS)
        return convert.dataset_revision(rev)

    async def ListDatasetRevisions(
        self, request: pb.ListDatasetRevisionsRequest, context: Ctx
    ) -> pb.ListDatasetRevisionsResponse:
        query = convert.revision_query(request)
        page = await _run(self.r.list_revisions, current_team(), DATASETS, query)
        return pb.ListDatasetRevisionsResponse(
            revisions=_items(page, convert.dataset_revision), next_page_token=page.next_page_token
        )

    async def ReadDatasetRows(
        self, request: pb.ReadDatasetRowsRequest, context: Ctx
    ) -> AsyncIterator[pb.ReadDatasetRowsResponse]:
        batch_size = request.batch_size or 256
        if batch_size < 0:
            raise InvalidArgument(
                "batch_size must be >= 0",
                violations=[FieldViolation("batch_size", "must be >= 0")],
            )
        _rev, rows = await _run(self.r.read_rows, current_team(), convert.row_query(request))
        # Reading, parsing and building batches happen in a worker thread, one batch ahead.
        async for batch in produce_prefetched(convert.row_batches(rows, batch_size)):
            yield batch

    async def DownloadDatasetRevision(
        self, request: pb.DownloadDatasetRevisionRequest, context: Ctx
    ) -> AsyncIterator[pb.DownloadChunk]:
        chunk = _chunk_size(request.chunk_size)
        rev = convert.dataset_revision(
            await _run(self.r.get_revision, current_team(), request.name, DATASETS)
        )
        manifest = convert.dataset_manifest(rev, DATA_FILE)
        async for message in self._download([(DATA_FILE, rev.sha256)], manifest, chunk):
            yield message

    async def SetDatasetAlias(self, request: pb.SetDatasetAliasRequest, context: Ctx) -> pb.Dataset:
        r = await _run(
            self.r.set_alias,
            current_team(),
            request.name,
            DATASETS,
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
            DATASETS,
            changes,
            request.dataset.etag,
            "dataset.name",
        )
        return convert.dataset(r)

    # Evaluators -----------------------------------------------------------------------------

    async def CreateEvaluator(
        self, request: pb.CreateEvaluatorRequest, context: Ctx
    ) -> pb.Evaluator:
        new = convert.new_resource(request.evaluator_id, request)
        return convert.evaluator(
            await _run(self.r.create_resource, current_team(), EVALUATORS, new)
        )

    async def GetEvaluator(self, request: pb.GetEvaluatorRequest, context: Ctx) -> pb.Evaluator:
        return convert.evaluator(
            await _run(self.r.get_resource, current_team(), request.name, EVALUATORS)
        )

    async def ListEvaluators(
        self, request: pb.ListEvaluatorsRequest, context: Ctx
    ) -> pb.ListEvaluatorsResponse:
        query = convert.resource_query(request)
        page = await _run(self.r.list_resources, current_team(), EVALUATORS, query)
        return pb.ListEvaluatorsResponse(
            evaluators=_items(page, convert.evaluator), next_page_token=page.next_page_token
        )

    async def DeleteEvaluator(
        self, request: pb.DeleteEvaluatorRequest, context: Ctx
    ) -> pb.DeleteEvaluatorResponse:
        await _run(self.r.delete, current_team(), request.name, EVALUATORS)
        return pb.DeleteEvaluatorResponse()

    async def CreateEvaluatorRevision(
        self, request: pb.CreateEvaluatorRevisionRequest, context: Ctx
    ) -> pb.EvaluatorRevision:
        draft = convert.evaluator_draft(request)
        rev = await _run(self.r.create_evaluator_revision, current_team(), draft)
        return convert.evaluator_revision(rev)

    async def GetEvaluatorRevision(
        self, request: pb.GetEvaluatorRevisionRequest, context: Ctx
    ) -> pb.EvaluatorRevision:
        rev = await _run(self.r.get_revision, current_team(), request.name, EVALUATORS)
        return convert.evaluator_revision(rev)

    async def ListEvaluatorRevisions(
        self, request: pb.ListEvaluatorRevisionsRequest, context: Ctx
    ) -> pb.ListEvaluatorRevisionsResponse:
        query = convert.revision_query(request)
        page = await _run(self.r.list_revisions, current_team(), EVALUATORS, query)
        return pb.ListEvaluatorRevisionsResponse(
            revisions=_items(page, convert.evaluator_revision),
            next_page_token=page.next_page_token,
        )

    async def SetEvaluatorAlias(
        self, request: pb.SetEvaluatorAliasRequest, context: Ctx
    ) -> pb.Evaluator:
        r = await _run(
            self.r.set_alias,
            current_team(),
            request.name,
            EVALUATORS,
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
            EVALUATORS,
            changes,
            request.evaluator.etag,
            "evaluator.name",
        )
        return convert.evaluator(r)
