"""All protobuf <-> domain conversion of the registry in one place."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf import field_mask_pb2, json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import FieldViolation, InvalidArgument
from services.common.timestamps import to_timestamp
from services.registry.store import Resource, ResourceChanges, Revision
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
    json_format.ParseDict(rev.body, message, ignore_unknown_fields=True)
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
    return _fill(registry_pb2.EvaluatorRevision(), rev)  # type: ignore[no-any-return]
