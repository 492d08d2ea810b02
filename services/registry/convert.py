"""All protobuf <-> domain conversion of the registry in one place."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from services.common.timestamps import to_timestamp
from services.registry.store import Resource, Revision
from tlm.registry.v1 import registry_pb2


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
