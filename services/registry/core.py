"""The registry's domain core: models, datasets and evaluators over a metadata store and a
blob store. Synchronous and free of gRPC; the servicer converts requests to the domain types of
`domain.py`, and runs these methods in worker threads. Listing, paging and upload staging
happen here too: the servicer never reaches the store or the staging folder."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from services.common import proto_json
from services.common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    field_error,
)
from services.common.pagination import decode_token, encode_token, page_size
from services.registry.blobs import BlobStore
from services.registry.datasets import validate_file
from services.registry.domain import (
    DatasetHeader,
    EvaluatorDraft,
    ModelHeader,
    NewResource,
    Page,
    Resource,
    ResourceChanges,
    ResourceQuery,
    Revision,
    RevisionQuery,
    RowQuery,
    StaleBase,
)
from services.registry.rows import RowReader, check_row_query
from services.registry.store import MetadataStore
from services.registry.uploads import DATA_FILE, DatasetUpload, ModelUpload
from services.specs.names import Collection, check_id, parse_resource, parse_revision
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import evaluator_pb2

APPEND_RETRIES = 20
SpecValidator = Callable[[str], evaluator_pb2.EvaluatorSpec]
__all__ = ["DATA_FILE", "Registry", "parse_spec_json", "temp_file"]


def temp_file(folder: Path, prefix: str) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix)
    os.close(fd)  # only the name is wanted; an open descriptor would leak
    return Path(name)


def parse_spec_json(spec_json: str) -> evaluator_pb2.EvaluatorSpec:
    """Minimal spec check used until the shared validator (services/specs) is plugged in."""
    spec = evaluator_pb2.EvaluatorSpec()
    try:
        proto_json.parse(spec_json, spec)  # v1.0 enum names (`"unit": "WORDS"`) load too
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
        self.rows = RowReader(blobs)

    # Shared ---------------------------------------------------------------------------------

    def create_resource(self, team: str, coll: Collection, new: NewResource) -> Resource:
        field = {Collection.MODELS: "model_id", Collection.DATASETS: "dataset_id"}
        check_id(new.resource_id, field.get(coll, "evaluator_id"))
        if coll is Collection.DATASETS and new.dataset_kind == 0:
            raise InvalidArgument(
                "kind must be set", violations=[FieldViolation("kind", "required")]
            )
        return self.store.create_resource(
            team, coll, new.resource_id, new.description, new.labels, new.dataset_kind
        )

    def get_resource(self, team: str, name: str, coll: Collection) -> Resource:
        r = parse_resource(name, coll)
        return self.store.get_resource(team, coll, r.resource_id)

    def list_resources(self, team: str, coll: Collection, query: ResourceQuery) -> Page[Resource]:
        """A page of resources by id; the token carries the filters it was made for."""
        filters: dict[str, Any] = {"c": coll.value, "p": query.prefix, "l": dict(query.labels)}
        filters["k"] = query.dataset_kind
        size = page_size(query.page_size)
        after = decode_token(query.page_token, filters)
        if after is not None and not isinstance(after, str):
            raise field_error("page_token", "not a token returned by this list method")
        rows = self.store.list_resources(
            team,
            coll,
            after=after,
            limit=size,
            prefix=query.prefix,
            labels=query.labels,
            dataset_kind=query.dataset_kind,
        )
        token = encode_token(rows[size - 1].resource_id, filters) if len(rows) > size else ""
        return Page(rows[:size], token)

    def get_revision(self, team: str, name: str, coll: Collection, field: str = "name") -> Revision:
        r = parse_revision(name, coll, field)
        return self.store.get_revision(team, coll, r.parent.resource_id, r.revision)

    def list_revisions(self, team: str, coll: Collection, query: RevisionQuery) -> Page[Revision]:
        """A page of revisions, newest first."""
        parent = parse_resource(query.parent, coll, "parent")
        size = page_size(query.page_size)
        filters = {"parent": query.parent}
        before = decode_token(query.page_token, filters)
        if before is not None and (not isinstance(before, int) or before < 1):
            raise field_error("page_token", "not a token returned by this list method")
        rows = self.store.list_revisions(team, coll, parent.resource_id, before=before, limit=size)
        token = encode_token(rows[size - 1].seq, filters) if len(rows) > size else ""
        return Page(rows[:size], token)

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

    def begin_model_upload(self, team: str, header: ModelHeader) -> ModelUpload:
        return ModelUpload.begin(self, team, header)

    # Datasets -------------------------------------------------------------------------------

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
            says = registry_pb2.DatasetKind.Name(kind)  # type: ignore[arg-type]
            raise FailedPrecondition(
                f"datasets/{rid} is of kind {have}; {field} says {says}",
                violations=[FieldViolation(field, f"must be {have} or unset")],
            )
        return existing.dataset_kind

    def check_dataset_header(self, team: str, header: DatasetHeader) -> tuple[str, int]:
        """The dataset id and kind an upload targets; checked before any bytes are received."""
        parent = parse_resource(header.parent, Collection.DATASETS, "header.parent")
        kind = self._dataset_kind(team, parent.resource_id, header.kind, "header.kind")
        return parent.resource_id, kind

    def begin_dataset_upload(self, team: str, header: DatasetHeader) -> DatasetUpload:
        return DatasetUpload.begin(self, team, header)

    def upload_dataset(
        self,
        team: str,
        header: DatasetHeader,
        staged: Path,
        base: Revision | None = None,
        expect_seq: int | None = None,
    ) -> Revision:
        """Validate the staged file and store it as a revision (or return the earlier one for
        a known request_id). With `base`, the new rows extend that revision's rows."""
        rid, kind = self.check_dataset_header(team, header)
        done = self.store.find_request(team, Collection.DATASETS, rid, header.request_id)
        if done is not None:
            return done
        staging = self.blobs.staging_dir()
        temps = [temp_file(staging, "ds-") for _ in range(3)]
        try:
            body = self._validated_rows(header, kind, staged, base, temps)
            revision, _new = self.store.add_revision(
                team,
                Collection.DATASETS,
                rid,
                request_id=header.request_id,
                body=lambda _rid: body,
                blobs=[body.sha256],
                expect_seq=expect_seq,
                create_parent=lambda: self.store.create_resource(
                    team, Collection.DATASETS, rid, dataset_kind=kind, exist_ok=True
                ),
            )
            return revision
        finally:
            for t in temps:
                t.unlink(missing_ok=True)

    def _validated_rows(
        self,
        header: DatasetHeader,
        kind: int,
        staged: Path,
        base: Revision | None,
        temps: list[Path],
    ) -> registry_pb2.DatasetRevision:
        """Validate the staged rows (after `base`'s), store the canonical file as a blob, and
        return the new revision's facts."""
        out, new_rows, combined = temps
        fmt = header.format or registry_pb2.DATASET_FORMAT_JSONL
        limits = {"max_row_bytes": self.max_row_bytes, "max_errors": self.max_row_errors}
        if base is None:
            facts = validate_file(staged, fmt, kind, out, **limits)
        else:
            # Validate the new rows alone so errors carry their own row numbers.
            validate_file(staged, fmt, kind, new_rows, **limits)
            with combined.open("wb") as f:
                for block in self.blobs.read(_dataset_blob(base)):
                    f.write(block)
                f.write(new_rows.read_bytes())
            # The base's rows were validated when stored; only re-derive the facts.
            jsonl = registry_pb2.DATASET_FORMAT_JSONL
            facts = validate_file(combined, jsonl, kind, out, max_row_bytes=2**62, max_errors=1)
        self.blobs.put(out, facts.sha256)
        return registry_pb2.DatasetRevision(
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
        header = DatasetHeader(
            parent=parent_name,
            kind=kind,
            format=registry_pb2.DATASET_FORMAT_JSONL,
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

    def read_rows(self, team: str, query: RowQuery) -> tuple[Revision, Iterator[tuple[int, bytes]]]:
        """The revision and its rows for this reader: (row index, JSON line) pairs."""
        count = check_row_query(query)
        revision = self.get_revision(team, query.name, Collection.DATASETS)
        return revision, self.rows.rows(_dataset_blob(revision), query, count)

    # Evaluators -----------------------------------------------------------------------------

    def create_evaluator_revision(self, team: str, draft: EvaluatorDraft) -> Revision:
        parent = parse_resource(draft.parent, Collection.EVALUATORS, "parent")
        spec = self.validate_spec(draft.spec_json)
        body = registry_pb2.EvaluatorRevision(
            spec=spec, spec_json=proto_json.to_json(spec), description=draft.description
        )
        revision, _ = self.store.add_revision(
            team,
            Collection.EVALUATORS,
            parent.resource_id,
            request_id=draft.request_id,
            body=lambda _rid: body,
            blobs=[],
            create_parent=lambda: self.store.create_resource(
                team, Collection.EVALUATORS, parent.resource_id, exist_ok=True
            ),
        )
        return revision


def _dataset_blob(revision: Revision) -> str:
    """The content key of a dataset revision's canonical JSONL file."""
    assert isinstance(revision.body, registry_pb2.DatasetRevision)
    return revision.body.sha256
