"""What the pages show, computed from service responses: the lineage tree, row errors of an
upload, enum names for people, job curves from events. Pure: no RPCs, no HTML."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common import proto_json
from services.common.errors import FieldViolation

ROW_FIELD = re.compile(r"rows\[(\d+)\]\.?(.*)")


@dataclass
class Node:
    """One model revision in the lineage tree, with the revisions trained from it."""

    name: str
    format: str
    datasets: Sequence[str]
    job: str
    evaluator: str
    children: list[Node] = field(default_factory=list)


def lineage_forest(revisions: Iterable[Any]) -> list[Node]:
    """Revisions as trees: each under the base revision it was trained from (or is an adapter
    of); a revision whose base is not listed is a root.

    >>> from tlm.registry.v1 import registry_pb2 as r
    >>> revs = [r.ModelRevision(name="models/a/revisions/r1"),
    ...         r.ModelRevision(name="models/b/revisions/r1",
    ...                         lineage=r.Lineage(base_model_revision="models/a/revisions/r1"))]
    >>> [(n.name, [c.name for c in n.children]) for n in lineage_forest(revs)]
    [('models/a/revisions/r1', ['models/b/revisions/r1'])]
    """
    nodes = {
        rev.name: Node(
            rev.name,
            enum_name_of(rev, "format"),
            list(rev.lineage.dataset_revisions),
            rev.lineage.training_job,
            rev.lineage.evaluator_revision,
        )
        for rev in revisions
    }
    roots: list[Node] = []
    for rev in revisions:
        base = nodes.get(rev.lineage.base_model_revision)
        (base.children if base is not None and base is not nodes[rev.name] else roots).append(
            nodes[rev.name]
        )
    return roots


def enum_name_of(message: Any, field_name: str) -> str:
    """A message's enum field as people read it (`RUNNING`, `LORA_ADAPTER`)."""
    f = message.DESCRIPTOR.fields_by_name[field_name]
    return proto_json.short_name(f.enum_type, getattr(message, field_name))


@dataclass(frozen=True)
class RowError:
    row: int  # 0-based, as the registry counts
    column: str
    message: str


def row_errors(violations: Iterable[FieldViolation]) -> tuple[list[RowError], list[str]]:
    """An upload's violations split into per-row errors (`rows[3].chosen`) and the rest.

    >>> rows, other = row_errors([FieldViolation("rows[3].chosen", "is required"),
    ...                          FieldViolation("header.kind", "bad")])
    >>> rows, other
    ([RowError(row=3, column='chosen', message='is required')], ['header.kind: bad'])
    """
    rows, other = [], []
    for v in violations:
        m = ROW_FIELD.fullmatch(v.field)
        if m:
            rows.append(RowError(int(m.group(1)), m.group(2), v.description))
        else:
            other.append(f"{v.field}: {v.description}" if v.field else v.description)
    return rows, other


def field_errors(violations: Iterable[FieldViolation]) -> dict[str, str]:
    """Violations by the form input they belong to: `spec.grpo.beta` -> `grpo.beta`.

    >>> field_errors([FieldViolation("spec.grpo.beta", "must be >= 0")])
    {'grpo.beta': 'must be >= 0'}
    """
    found: dict[str, str] = {}
    for v in violations:
        key = v.field.removeprefix("spec.")
        found[key] = f"{found[key]}; {v.description}" if key in found else v.description
    return found


def input_id(path: str) -> str:
    """The id of a form input named by a spec path (forms.Field.id)."""
    return "f-" + path.replace(".", "-")
