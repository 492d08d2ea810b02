"""The registry's domain core: models, datasets and evaluators over a metadata store and a
blob store. Synchronous and free of gRPC; the servicer runs it in worker threads."""

from __future__ import annotations

import array
import functools
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from services.common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from services.registry import models
from services.registry.blobs import BlobStore, remove_tree
from services.registry.datasets import validate_file
from services.registry.names import Collection, parse_resource, parse_revision
from services.registry.store import (
    BaseRevisionGone,
    MetadataStore,
    Resource,
    ResourceChanges,
    Revision,
    StaleBase,
)
from services.registry.uploads import StagedFiles, check_manifest
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import evaluator_pb2

DATA_FILE = "data.jsonl"
BASE_FIELD = "header.lineage.base_model_revision"
APPEND_RETRIES = 20
SpecValidator = Callable[[str], evaluator_pb2.EvaluatorSpec]


def _lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a stream of byte blocks, without their newlines."""
    rest = b""
    for block in blocks:
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def temp_file(folder: Path, prefix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix)
    os.close(fd)  # only the name is wanted; an open descriptor would leak
    return Path(name)


def _to_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)  # type: ignore[no-any-return]


def parse_spec_json(spec_json: str) -> evaluator_pb2.EvaluatorSpec:
    """Minimal spec check used until the reward service's validator is plugged in."""
    spec = evaluator_pb2.EvaluatorSpec()
    try:
        json_format.Parse(spec_json, spec)
    except json_format.ParseError as exc:
        raise InvalidArgument(
            f"spec_json: {exc}", violations=[FieldViolation("spec_json", str(exc))]
        ) from exc
    return spec


class Registry:
    def __init__(
        self,
        store: MetadataStore,
        blobs: BlobStore,
        *,
        max_row_bytes: int = 1024 * 1024,
        max_row_errors: int = 20,
        validate_spec: SpecValidator = parse_spec_json,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.max_row_bytes = max_row_bytes
        self.max_row_errors = max_row_errors
        self.validate_spec = validate_spec
        # Blobs are immutable, so a dataset's line offsets are computed once: readers that page
        # through a shuffled revision (GRPO reads a batch per step) do not rescan the file.
        self._line_offsets = functools.lru_cache(maxsize=16)(self._scan_line_offsets)

    # Shared ---------------------------------------------------------------------------------

    def get_resource(self, team: str, name: str, coll: Collection) -> Resource:
        r = parse_resource(name, coll)
        return self.store.get_resource(team, coll, r.resource_id)

    def get_revision(self, team: str, name: str, coll: Collection, field: str = "name") -> Revision:
        r = parse_revision(name, coll, field)
        return self.store.get_revision(team, coll, r.parent.resource_id, r.revision)

    def delete(self, team: str, name: str, coll: Collection) -> None:
        r = parse_resource(name, coll)
        # A model that others' lineage names is refused inside the store's transaction.
        self.store.delete_resource(team, coll, r.resource_id)
        # Blobs are content-addressed and may be shared; unreferenced ones are left for a
        # garbage collector rather than deleted here.

    def set_alias(
        self, team: str, name: str, coll: Collection, alias: str, target: str, etag: str
    ) -> Resource:
        r = parse_resource(name, coll)
        return self.store.set_alias(team, coll, r.resource_id, alias, target, etag)

    def update(
        self,
        team: str,
        name: str,
        coll: Collection,
        changes: ResourceChanges,
        etag: str,
        field: str = "name",
    ) -> Resource:
        r = parse_resource(name, coll, field)
        return self.store.update_resource(team, coll, r.resource_id, changes, etag)

    def read_blob(self, key: str, chunk_size: int) -> Iterator[bytes]:
        return self.blobs.read(key, chunk_size)

    # Models ---------------------------------------------------------------------------------

    def begin_model_upload(
        self, team: str, header: registry_pb2.ModelRevisionHeader
    ) -> ModelUpload:
        parent = parse_resource(header.parent, Collection.MODELS, "header.parent")
        if header.format not in (registry_pb2.FULL_WEIGHTS, registry_pb2.LORA_ADAPTER):
            raise InvalidArgument(
                "header.format must be FULL_WEIGHTS or LORA_ADAPTER",
                violations=[FieldViolation("header.format", "must be set")],
            )
        check_manifest(header.manifest, "header.manifest")
        lineage = registry_pb2.Lineage()
        lineage.CopyFrom(header.lineage)
        base = None
        if header.lineage.base_model_revision:
            base = self.get_revision(
                team, header.lineage.base_model_revision, Collection.MODELS, BASE_FIELD
            )
            lineage.base_model_revision = base.name  # aliases resolved: lineage is immutable
            if (
                header.format == registry_pb2.LORA_ADAPTER
                and base.body.get("format") != "FULL_WEIGHTS"
            ):
                raise FailedPrecondition(
                    f"{base.name} is not a full-weights revision; adapters apply to full weights",
                    violations=[FieldViolation(BASE_FIELD, "not full weights")],
                )
        elif header.format == registry_pb2.LORA_ADAPTER:
            raise InvalidArgument(
                f"a LORA_ADAPTER revision needs {BASE_FIELD}",
                violations=[FieldViolation(BASE_FIELD, "required")],
            )
        for i, ds in enumerate(header.lineage.dataset_revisions):
            field = f"header.lineage.dataset_revisions[{i}]"
            lineage.dataset_revisions[i] = self.get_revision(
                team, ds, Collection.DATASETS, field
            ).name
        return ModelUpload(self, team, parent.resource_id, header, lineage, base)

    # Datasets -------------------------------------------------------------------------------

    def create_dataset(
        self, team: str, dataset_id: str, kind: int, description: str, labels: dict[str, str]
    ) -> Resource:
        from services.registry.names import check_id

        check_id(dataset_id, "dataset_id")
        if kind == registry_pb2.DATASET_KIND_UNSPECIFIED:
            raise InvalidArgument(
                "kind must be set", violations=[FieldViolation("kind", "required")]
            )
        return self.store.create_resource(
            team, Collection.DATASETS, dataset_id, description, labels, dataset_kind=kind
        )

    def _dataset_kind(self, team: str, rid: str, kind: int, field: str) -> int:
        try:
            existing = self.store.get_resource(team, Collection.DATASETS, rid)
        except NotFound:
            if not kind:
                raise InvalidArgument(
                    f"{field} is required to create datasets/{rid}",
                    violations=[FieldViolation(field, "required for a new dataset")],
                ) from None
            return kind
        if kind and kind != existing.dataset_kind:
            have = registry_pb2.DatasetKind.Name(existing.dataset_kind)  # type: ignore[arg-type]
            raise FailedPrecondition(
                f"datasets/{rid} is of kind {have}; {field} says "
                f"{registry_pb2.DatasetKind.Name(kind)}",  # type: ignore[arg-type]
                violations=[FieldViolation(field, f"must be {have} or unset")],
            )
        return existing.dataset_kind

    def check_dataset_header(
        self, team: str, header: registry_pb2.DatasetRevisionHeader
    ) -> tuple[Any, int]:
        """The parent and kind an upload targets; checked before any bytes are received."""
        parent = parse_resource(header.parent, Collection.DATASETS, "header.parent")
        return parent, self._dataset_kind(team, parent.resource_id, header.kind, "header.kind")

    def upload_dataset(
        self,
        team: str,
        header: registry_pb2.DatasetRevisionHeader,
        staged: Path,
        base: Revision | None = None,
        expect_seq: int | None = None,
    ) -> Revision:
        """Validate the staged file and store it as a revision (or return the earlier one for
        a known request_id). With `base`, the new rows extend that revision's rows."""
        parent, kind = self.check_dataset_header(team, header)
        done = self.store.find_request(
            team, Collection.DATASETS, parent.resource_id, header.request_id
        )
        if done is not None:
            return done
        fmt = header.format or registry_pb2.JSONL
        staging = self.blobs.staging_dir()
        temps = [temp_file(staging, "ds-") for _ in range(3)]
        out, new_rows, combined = temps
        limits = {"max_row_bytes": self.max_row_bytes, "max_errors": self.max_row_errors}
        try:
            if base is None:
                facts = validate_file(staged, fmt, kind, out, **limits)
            else:
                # Validate the new rows alone so errors carry their own row numbers.
                validate_file(staged, fmt, kind, new_rows, **limits)
                with combined.open("wb") as f:
                    for block in self.blobs.read(base.body["sha256"]):
                        f.write(block)
                    f.write(new_rows.read_bytes())
                # The base's rows were validated when stored; only re-derive the facts.
                facts = validate_file(
                    combined, registry_pb2.JSONL, kind, out, max_row_bytes=2**62, max_errors=1
                )
            self.blobs.put(out, facts.sha256)
            body = registry_pb2.DatasetRevision(
                kind=kind,  # type: ignore[arg-type]
                row_count=facts.row_count,
                sha256=facts.sha256,
                size_bytes=facts.size_bytes,
                columns=facts.columns(),
                length_stats=facts.length_stats(),
                description=header.description,
                labels=dict(header.labels),
                parent_revision=base.name if base else "",
            )
            revision, _new = self.store.add_revision(
                team,
                Collection.DATASETS,
                parent.resource_id,
                request_id=header.request_id,
                body=lambda _rid: _to_json(body),
                blobs=[facts.sha256],
                expect_seq=expect_seq,
                create_parent=lambda: self.store.create_resource(
                    team,
                    Collection.DATASETS,
                    parent.resource_id,
                    dataset_kind=kind,
                    exist_ok=True,
                ),
            )
            return revision
        finally:
            for t in temps:
                t.unlink(missing_ok=True)

    def append_rows(
        self, team: str, parent_name: str, kind: int, rows: list[dict[str, Any]], request_id: str
    ) -> Revision:
        """A new revision: the latest one's rows plus `rows`. Concurrent appends each rebuild on
        the newest revision (optimistic retry), so no append loses another's rows."""
        parse_resource(parent_name, Collection.DATASETS, "parent")
        if not rows:
            raise InvalidArgument(
                "rows must not be empty", violations=[FieldViolation("rows", "empty")]
            )
        header = registry_pb2.DatasetRevisionHeader(
            parent=parent_name,
            kind=kind,  # type: ignore[arg-type]
            format=registry_pb2.JSONL,
            request_id=request_id,
        )
        staged = temp_file(self.blobs.staging_dir(), "append-")
        try:
            staged.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            for _attempt in range(APPEND_RETRIES):
                base = self._latest(team, parent_name)
                try:
                    return self.upload_dataset(
                        team, header, staged, base, expect_seq=base.seq if base else 0
                    )
                except StaleBase:
                    continue
            raise Aborted(f"{parent_name} is changing too fast; retry the append")
        finally:
            staged.unlink(missing_ok=True)

    def _latest(self, team: str, parent_name: str) -> Revision | None:
        rid = parse_resource(parent_name, Collection.DATASETS, "parent").resource_id
        try:
            return self.store.get_revision(team, Collection.DATASETS, rid, "latest")
        except NotFound:
            return None

    def read_rows(
        self, team: str, request: registry_pb2.ReadDatasetRowsRequest
    ) -> tuple[Revision, Iterator[tuple[int, bytes]]]:
        """The revision and its rows for this reader: (row index, JSON line) pairs."""
        count = request.shard_count or 1
        if count < 1 or not 0 <= request.shard_index < count:
            raise InvalidArgument(
                f"shard_index must be in [0, {count})",
                violations=[FieldViolation("shard_index", f"must be in [0, shard_count={count})")],
            )
        if request.offset < 0 or request.limit < 0:
            raise InvalidArgument("offset and limit must be >= 0")
        revision = self.get_revision(team, request.name, Collection.DATASETS)
        return revision, self._shard_rows(revision, request, count)

    def _scan_line_offsets(self, key: str) -> array.array[int]:
        """Byte offsets of each line start, plus the end (8 bytes per row)."""
        offsets = array.array("Q", [0])
        with self.blobs.local_copy(key).open("rb") as f:
            for line in f:
                offsets.append(offsets[-1] + len(line))
        return offsets

    def _shard_rows(
        self, revision: Revision, request: registry_pb2.ReadDatasetRowsRequest, count: int
    ) -> Iterator[tuple[int, bytes]]:
        """This shard's rows, streamed: never the whole file in memory."""
        key = revision.body["sha256"]
        stop = request.offset + request.limit if request.limit else None
        if not request.shuffle:
            mine = (
                (i, line)
                for i, line in enumerate(_lines(self.blobs.read(key)))
                if i % count == request.shard_index
            )
            yield from itertools.islice(mine, request.offset, stop)
            return
        # A seeded permutation every shard computes alike, then seeks to each of its rows.
        path = self.blobs.local_copy(key)
        offsets = self._line_offsets(key)
        rows = len(offsets) - 1
        order = np.random.default_rng(request.shuffle_seed).permutation(rows)
        with path.open("rb") as f:
            for index in order[request.shard_index :: count][request.offset : stop]:
                f.seek(offsets[index])
                yield int(index), f.read(offsets[index + 1] - offsets[index]).rstrip(b"\n")

    # Evaluators -----------------------------------------------------------------------------

    def create_evaluator_revision(
        self, team: str, request: registry_pb2.CreateEvaluatorRevisionRequest
    ) -> Revision:
        parent = parse_resource(request.parent, Collection.EVALUATORS, "parent")
        has_spec = request.HasField("spec")
        if has_spec == bool(request.spec_json):
            raise InvalidArgument(
                "set exactly one of spec and spec_json",
                violations=[FieldViolation("spec_json", "exactly one of spec, spec_json")],
            )
        spec_json = request.spec_json or json_format.MessageToJson(
            request.spec, preserving_proto_field_name=True
        )
        spec = self.validate_spec(spec_json)
        normalized = json_format.MessageToJson(spec, preserving_proto_field_name=True, indent=2)
        body = registry_pb2.EvaluatorRevision(
            spec=spec, spec_json=normalized, description=request.description
        )
        revision, _ = self.store.add_revision(
            team,
            Collection.EVALUATORS,
            parent.resource_id,
            request_id=request.request_id,
            body=lambda _rid: _to_json(body),
            blobs=[],
            create_parent=lambda: self.store.create_resource(
                team, Collection.EVALUATORS, parent.resource_id, exist_ok=True
            ),
        )
        return revision


class ModelUpload:
    """One UploadModelRevision stream: chunks staged and verified, then stored atomically."""

    def __init__(
        self,
        registry: Registry,
        team: str,
        model_id: str,
        header: registry_pb2.ModelRevisionHeader,
        lineage: registry_pb2.Lineage,
        base: Revision | None,
    ) -> None:
        self.registry = registry
        self.team = team
        self.model_id = model_id
        self.header = header
        self.lineage = lineage
        self.base = base  # checked again when the revision is stored: it may be deleted meanwhile
        self.done = registry.store.find_request(
            team, Collection.MODELS, model_id, header.request_id
        )
        self.staged = StagedFiles(registry.blobs.staging_dir(), header.manifest)

    def write(self, chunk: registry_pb2.FileChunk) -> None:
        if self.done is None:  # a retried upload's bytes are not needed again
            self.staged.write(chunk.path, chunk.offset, chunk.data)

    def finish(self) -> Revision:
        if self.done is not None:
            return self.done
        folder = self.staged.finish()
        fmt = self.header.format
        metadata = (
            models.adapter_metadata(folder)
            if fmt == registry_pb2.LORA_ADAPTER
            else models.full_weights_metadata(folder)
        )
        for entry in self.header.manifest.files:
            self.registry.blobs.put(folder / entry.path, entry.sha256)
        body = registry_pb2.ModelRevision(
            format=fmt,
            lineage=self.lineage,
            metadata=metadata,
            manifest=registry_pb2.Manifest(
                files=self.header.manifest.files,
                total_bytes=sum(f.size_bytes for f in self.header.manifest.files),
            ),
            description=self.header.description,
            labels=dict(self.header.labels),
        )
        store = self.registry.store
        try:
            revision, _ = store.add_revision(
                self.team,
                Collection.MODELS,
                self.model_id,
                request_id=self.header.request_id,
                body=lambda _rid: _to_json(body),
                blobs=[f.sha256 for f in self.header.manifest.files],
                create_parent=lambda: store.create_resource(
                    self.team, Collection.MODELS, self.model_id, exist_ok=True
                ),
                base=self.base,
            )
        except BaseRevisionGone as exc:
            raise NotFound(
                exc.message,
                violations=[FieldViolation(BASE_FIELD, "deleted during the upload")],
                metadata=exc.metadata,
            ) from None
        return revision

    def cleanup(self) -> None:
        self.staged.cleanup()
        remove_tree(self.staged.root)
