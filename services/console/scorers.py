"""The evaluator builder's inputs, from ListScorerTypes: each scorer type's parameters (and the
ones every scorer has) as form inputs whose `path` is where the value goes in the scorer's JSON
object. The page's script builds the spec from them; the reward service validates it."""

from __future__ import annotations

from dataclasses import dataclass

from services.common import proto_json
from tlm.reward.v1 import reward_service_pb2 as rs

P = rs.ParameterType
INPUT = {  # ParameterType -> how the page reads and types the input
    P.PARAMETER_TYPE_STRING: "text",
    P.PARAMETER_TYPE_INTEGER: "int",
    P.PARAMETER_TYPE_NUMBER: "number",
    P.PARAMETER_TYPE_BOOLEAN: "bool",
    P.PARAMETER_TYPE_ENUM: "choice",
    P.PARAMETER_TYPE_DURATION: "text",
    P.PARAMETER_TYPE_STRING_LIST: "list",
    P.PARAMETER_TYPE_JSON_OBJECT: "json",
}


@dataclass(frozen=True)
class Param:
    path: str  # inside the scorer object: "weight", "regex.pattern"
    kind: str  # INPUT's values
    default: str  # JSON text; "" when none
    required: bool
    choices: tuple[str, ...]
    description: str

    @property
    def label(self) -> str:
        return self.path.split(".", 1)[-1].replace("_", " ").replace(".", " ")


@dataclass(frozen=True)
class ScorerForm:
    type: str
    family: str
    description: str
    params: tuple[Param, ...]


def _params(infos: list[rs.ParameterInfo], prefix: str) -> tuple[Param, ...]:
    return tuple(
        Param(
            prefix + p.name,
            INPUT[p.type],
            p.default_json,
            p.required,
            tuple(p.enum_values),
            p.description,
        )
        for p in infos
        if p.type in INPUT  # message headers are not inputs; their fields are
    )


def builder_scorers(response: rs.ListScorerTypesResponse) -> list[ScorerForm]:
    """One form per scorer type: the common parameters, then the type's own under its key.

    >>> from services.reward.catalog import scorer_types
    >>> regex = next(s for s in builder_scorers(scorer_types()) if s.type == "regex")
    >>> [p.path for p in regex.params if p.required]
    ['name', 'regex.pattern']
    """
    common = _params(list(response.common_parameters), "")
    return [
        ScorerForm(
            t.type,
            proto_json.short_name(rs.ScorerFamily, t.family).lower(),
            t.description,
            common + _params(list(t.parameters), f"{t.type}."),
        )
        for t in response.scorer_types
    ]
