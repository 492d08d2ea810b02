"""Resource names: `models/{id}`, `models/{id}/revisions/{revision or alias}`, and the same for
datasets and evaluators. Ids are short, lowercase and can never be a path. The registry owns
these resources; evaluator specs name them (model scorers, review datasets), so the rules are
shared."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from services.common.errors import FieldViolation, InvalidArgument
from services.common.ids import ID_RULE, is_valid_id
from tlm.common.v1 import common_pb2

LATEST = "latest"
# The deploy service's resources are `deployments/{id}`; the gateway's OpenAI `model` is the id.
DEPLOYMENT_PREFIX = "deployments/"


class Collection(enum.StrEnum):
    MODELS = "models"
    DATASETS = "datasets"
    EVALUATORS = "evaluators"


@dataclass(frozen=True)
class ResourceName:
    collection: Collection
    resource_id: str

    def __str__(self) -> str:
        return f"{self.collection}/{self.resource_id}"

    def revision(self, revision_id: str) -> str:
        return f"{self}/revisions/{revision_id}"


@dataclass(frozen=True)
class RevisionName:
    parent: ResourceName
    revision: str  # an id ("r3") or an alias ("latest", "prod")

    def __str__(self) -> str:
        return self.parent.revision(self.revision)


def _invalid(field: str, value: str, expected: str) -> InvalidArgument:
    description = f"{value!r} is not valid: expected {expected}"
    return InvalidArgument(
        f"{field}: {description}",
        violations=[FieldViolation(field, description)],
        reason=common_pb2.INVALID_NAME,
    )


def check_id(value: str, field: str) -> str:
    if not is_valid_id(value):
        raise _invalid(field, value, ID_RULE)
    return value


def parse_resource(value: str, collection: Collection, field: str = "name") -> ResourceName:
    parts = value.split("/")
    if len(parts) != 2 or parts[0] != collection.value:
        raise _invalid(field, value, f"'{collection}/{{id}}'")
    return ResourceName(collection, check_id(parts[1], field))


def parse_revision(value: str, collection: Collection, field: str = "name") -> RevisionName:
    parts = value.split("/")
    if len(parts) != 4 or parts[0] != collection.value or parts[2] != "revisions":
        raise _invalid(field, value, f"'{collection}/{{id}}/revisions/{{revision or alias}}'")
    parent = ResourceName(collection, check_id(parts[1], field))
    return RevisionName(parent, check_id(parts[3], field))


def revision_id(seq: int) -> str:
    return f"r{seq}"


def is_revision_id(value: str) -> bool:
    return bool(re.fullmatch(r"r[1-9][0-9]*", value))
