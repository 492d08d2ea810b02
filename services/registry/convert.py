"""All protobuf <-> domain conversion of the registry in one place: requests into the domain
types of `domain.py`, domain results into response messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from google.protobuf import field_mask_pb2, json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common import proto_json
from services.common.errors import FieldViolation, InvalidArgument
from services.common.timestamps import to_timestamp
from services.registry.domain import (
    DatasetHeader,
    EvaluatorDraft,
    ModelHeader,
    NewResource,
    Resource,
    ResourceChanges,
    ResourceQuery,
    Revision,
    RevisionQuery,
    RowQuery,
)
from tlm.registry.v1 import registry_pb2


def check_enums(message: Message, at: str = "") -> None:
    """Every enum field of `message`, however deep, holds a number its enum defines. Proto3
    enums are open: an unknown number (`kind=99`) parses fine and, stored, breaks later calls."""
    bad = list(_unknown_enums(message, at))
    if bad:
        raise InvalidArgument(f"{bad[0].field}: {bad[0].description}", violations=bad)


def _unknown_enums(message: Message, at: str) -> Iterator[FieldViolation]:
    for field, value in message.ListFields():  # only set fields: zero is always defined
        path, element = f"{at}{field.name}", field
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            element = field.message_type.fields_by_name["value"]
            items = [(f"{path}[{key!r}]", item) for key, item in value.items()]
        elif field.is_repeated:
            items = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
        else:
            items = [(path, value)]
        for item_path, item in items:
            if element.type == FieldDescriptor.TYPE_MESSAGE:
                yield from _unknown_enums(item, f"{item_path}.")
            elif element.type == FieldDescriptor.TYPE_ENUM:
                yield from _check_number(element, item, item_path)


def _check_number(field: FieldDescriptor, number: int, path: str) -> Iterator[FieldViolation]:
    enum = field.enum_type
    if enum is not None and number not in enum.values_by_number:
        known = ", ".join(v.name for v in enum.values if v.number) or enum.values[0].name
        yield FieldViolation(path, f"{number} is not a {enum.name} (one of {known})")


MUTABLE = ("description", "labels")  # what Update methods change; the rest has its own method


def resource_changes(
    resource: registry_pb2.Model | registry_pb2.Dataset | registry_pb2.Evaluator,
    mask: field_mask_pb2.FieldMask,
) -> ResourceChanges:
    """An Update request's resource and update_mask (AIP-134) as the changes to make. No mask
    means the mutable fields that are set; "*" means all of them."""
    paths = list(mask.paths)
    if not paths:
        paths = [f for f in MUTABLE if getattr(resource, f)]
    elif paths == ["*"]:
        paths = list(MUTABLE)
    bad = [
        FieldViolation(f"update_mask.paths[{i}]", _why_not(resource, path))
        for i, path in enumerate(paths)
        if path not in MUTABLE
    ]
    if bad:
        raise InvalidArgument(f"{bad[0].field}: {bad[0].description}", violations=bad)
    if not paths:
        raise InvalidArgument(
            "update_mask: names no field to change",
            violations=[FieldViolation("update_mask", f"name one of {', '.join(MUTABLE)}")],
        )
    return ResourceChanges(
        description=resource.description if "description" in paths else None,
        labels=dict(resource.labels) if "labels" in paths else None,
    )


def _why_not(resource: Message, path: str) -> str:
    kind = resource.DESCRIPTOR.name
    if path not in resource.DESCRIPTOR.fields_by_name:
        return f"{path[:80]!r} is not a field of {kind}; updatable: {', '.join(MUTABLE)}"
    if path == "aliases":
        return f"'aliases' change through Set{kind}Alias"
    return f"{path!r} cannot be changed; updatable: {', '.join(MUTABLE)}"


def _common(r: Resource) -> dict[str, Any]:
    """The fields models, datasets and evaluators share."""
    return {
        "name": r.name,
        "description": r.description,
        "labels": r.labels,
        "latest_revision_id": r.latest_revision_id,
        "aliases": r.aliases,
        "etag": r.etag,
        "create_time": to_timestamp(r.create_time),
        "update_time": to_timestamp(r.update_time),
    }


def model(r: Resource) -> registry_pb2.Model:
    return registry_pb2.Model(**_common(r))


def dataset(r: Resource) -> registry_pb2.Dataset:
    return registry_pb2.Dataset(kind=r.dataset_kind, **_common(r))  # type: ignore[arg-type]


def evaluator(r: Resource) -> registry_pb2.Evaluator:
    return registry_pb2.Evaluator(**_common(r))


def _fill(message, rev: Revision):  # type: ignore[no-untyped-def]
    message.CopyFrom(rev.body)
    message.name = rev.name
    message.revision_id = rev.revision_id
    message.create_time.CopyFrom(to_timestamp(rev.create_time))
    del message.aliases[:]
    message.aliases.extend(rev.aliases)
    return message


def model_revision(rev: Revision) -> registry_pb2.ModelRevision:
    return _fill(registry_pb2.ModelRevision(), rev)  # type: ignore[no-any-return]


def dataset_revision(rev: Revision) -> registry_pb2.DatasetRevision:
    return _fill(registry_pb2.DatasetRevision(), rev)  # type: ignore[no-any-return]


def evaluator_revision(rev: Revision) -> registry_pb2.EvaluatorRevision:
    message: registry_pb2.EvaluatorRevision = _fill(registry_pb2.EvaluatorRevision(), rev)
    # spec_json is the normalised spec as JSON; one stored before the enum rename says
    # `"unit": "WORDS"`, so it is written again from the (upgraded) spec: readers see one form.
    message.spec_json = proto_json.to_json(message.spec)
    return message


# Requests -> domain -------------------------------------------------------------------------


def new_resource(resource_id: str, request: Any) -> NewResource:
    """A Create{Model,Dataset,Evaluator}Request's resource; its enums checked."""
    check_enums(request)
    return NewResource(
        resource_id=resource_id,
        description=request.description,
        labels=dict(request.labels),
        dataset_kind=getattr(request, "kind", 0),
    )


def resource_query(request: Any) -> ResourceQuery:
    """A List{Models,Datasets,Evaluators}Request's filters and page."""
    return ResourceQuery(
        prefix=request.name_prefix,
        labels=dict(request.labels),
        dataset_kind=getattr(request, "kind", 0),
        page_size=request.page_size,
        page_token=request.page_token,
    )


def revision_query(request: Any) -> RevisionQuery:
    return RevisionQuery(request.parent, request.page_size, request.page_token)


def model_header(header: registry_pb2.ModelRevisionHeader) -> ModelHeader:
    check_enums(header, "header.")
    return ModelHeader(
        parent=header.parent,
        format=header.format,
        manifest=header.manifest,
        lineage=header.lineage,
        description=header.description,
        labels=dict(header.labels),
        request_id=header.request_id,
    )


def dataset_header(header: registry_pb2.DatasetRevisionHeader) -> DatasetHeader:
    check_enums(header, "header.")
    return DatasetHeader(
        parent=header.parent,
        kind=header.kind,
        format=header.format,
        size_bytes=header.size_bytes,
        sha256=header.sha256,
        description=header.description,
        labels=dict(header.labels),
        request_id=header.request_id,
    )


def row_query(request: registry_pb2.ReadDatasetRowsRequest) -> RowQuery:
    return RowQuery(
        name=request.name,
        shard_index=request.shard_index,
        shard_count=request.shard_count,
        offset=request.offset,
        limit=request.limit,
        shuffle=request.shuffle,
        shuffle_seed=request.shuffle_seed,
    )


def evaluator_draft(request: registry_pb2.CreateEvaluatorRevisionRequest) -> EvaluatorDraft:
    """The spec as JSON text, from exactly one of `spec` and `spec_json`. No check_enums: the
    spec is the only part with enums, and spec validation refuses unknown numbers there, with
    paths relative to the spec."""
    if request.HasField("spec") == bool(request.spec_json):
        raise InvalidArgument(
            "set exactly one of spec and spec_json",
            violations=[FieldViolation("spec_json", "exactly one of spec, spec_json")],
        )
    spec_json = request.spec_json or json_format.MessageToJson(
        request.spec, preserving_proto_field_name=True
    )
    return EvaluatorDraft(request.parent, spec_json, request.description, request.request_id)


def appended_rows(request: registry_pb2.AppendDatasetRowsRequest) -> list[dict[str, Any]]:
    check_enums(request)
    return [json_format.MessageToDict(r) for r in request.rows]


# Domain -> responses ------------------------------------------------------------------------


def row_batches(
    rows: Iterator[tuple[int, bytes]], batch_size: int
) -> Iterator[registry_pb2.ReadDatasetRowsResponse]:
    """(row index, JSON line) pairs as responses of up to `batch_size` rows."""
    batch = registry_pb2.ReadDatasetRowsResponse()
    for index, line in rows:
        row = struct_pb2.Struct()
        row.update(json.loads(line))
        batch.rows.append(row)
        batch.row_indices.append(index)
        if len(batch.rows) >= batch_size:
            yield batch
            batch = registry_pb2.ReadDatasetRowsResponse()
    if batch.rows:
        yield batch


def dataset_manifest(rev: registry_pb2.DatasetRevision, path: str) -> registry_pb2.Manifest:
    """A dataset revision's one file as a download manifest."""
    entry = registry_pb2.ArtifactFile(path=path, size_bytes=rev.size_bytes, sha256=rev.sha256)
    return registry_pb2.Manifest(files=[entry], total_bytes=rev.size_bytes)
