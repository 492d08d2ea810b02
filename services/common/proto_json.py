"""Proto3 JSON in, with the enum names of v1.0 still accepted; enum names for people out.

Our enum values carry their enum's name (`SCORE_STATUS_OK`, `STATE_RUNNING`: buf's
ENUM_VALUE_PREFIX, so they never collide in C++ or other languages with package-scoped
enums). The rename is wire compatible (numbers unchanged), but JSON carries names: evaluator
specs stored in the registry, job spec files and scripts written before it say `"unit":
"WORDS"`, `"method": "GRPO"`. `parse_dict` maps those legacy names, by the message
descriptor, before `json_format.ParseDict`; output (`MessageToJson`) uses the new names.

People read and type the short names: tables show `RUNNING`, flags take `--state running`.
`short_name` and `enum_number` are the one place that strips or adds the prefix.
"""

from __future__ import annotations

import json
import re
from typing import Any, Protocol, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


class _Enum(Protocol):
    """A generated enum (`pb.Method`, `pb.TrainingJob.State`): its wrapper has a DESCRIPTOR."""

    DESCRIPTOR: EnumDescriptor


EnumLike = EnumDescriptor | EnumTypeWrapper | _Enum | type[_Enum]

# Enums whose values are deliberately unprefixed: ErrorReason names are ErrorInfo.reason strings.
UNPREFIXED = frozenset({"tlm.common.v1.ErrorReason"})


def _descriptor(enum: EnumLike) -> EnumDescriptor:
    return enum if isinstance(enum, EnumDescriptor) else enum.DESCRIPTOR


def prefix(enum: EnumLike) -> str:
    """The prefix of an enum's values: its name in UPPER_SNAKE_CASE and an underscore.

    >>> from tlm.trainer.v1 import trainer_pb2 as pb
    >>> prefix(pb.TrainingJob.State), prefix(pb.ParallelStrategy)
    ('STATE_', 'PARALLEL_STRATEGY_')
    """
    desc = _descriptor(enum)
    if desc.full_name in UNPREFIXED:
        return ""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", desc.name).upper() + "_"


def short_name(enum: EnumLike, number: int) -> str:
    """A value's name without its enum's prefix, as tables show it and flags take it.

    >>> from tlm.trainer.v1 import trainer_pb2 as pb
    >>> short_name(pb.TrainingJob.State, pb.TrainingJob.STATE_RUNNING), short_name(pb.Method, 99)
    ('RUNNING', '99')
    """
    value = _descriptor(enum).values_by_number.get(number)
    if value is None:
        return str(number)
    return value.name.removeprefix(prefix(enum))


def choices(enum: EnumLike) -> list[str]:
    """The short names a flag accepts, lower case, without the zero value.

    >>> from tlm.trainer.v1 import trainer_pb2 as pb
    >>> choices(pb.DeviceType)
    ['cpu', 'cuda']
    """
    desc = _descriptor(enum)
    return [short_name(desc, v.number).lower() for v in desc.values if v.number != 0]


def enum_number(enum: EnumLike, name: str) -> int:
    """The number of a value named in any case, with or without the prefix; ValueError if none
    or the zero value (`UNSPECIFIED` is never a choice).

    >>> from tlm.trainer.v1 import trainer_pb2 as pb
    >>> [enum_number(pb.Method, n) for n in ("grpo", "GRPO", "METHOD_GRPO", "method_grpo")]
    [5, 5, 5, 5]
    """
    number = lookup(_descriptor(enum), name, any_case=True)
    if not number:
        raise ValueError(f"expected one of {', '.join(choices(enum))}, got {name!r}")
    return number


def lookup(enum: EnumLike, name: str, *, any_case: bool = False) -> int | None:
    """The number of a value by its name or its v1.0 name (no prefix), None if there is none.

    >>> from tlm.registry.v1 import registry_pb2
    >>> names = ("MODEL_FORMAT_FULL_WEIGHTS", "FULL_WEIGHTS", "x")
    >>> [lookup(registry_pb2.ModelFormat, n) for n in names]
    [1, 1, None]
    """
    desc = _descriptor(enum)
    key = name.upper() if any_case else name
    for candidate in (key, prefix(desc) + key):
        value = desc.values_by_name.get(candidate)
        if value is not None:
            return int(value.number)
    return None


def upgrade_enums(data: Any, descriptor: Descriptor, *, any_case: bool = False) -> Any:
    """A copy of proto3 JSON `data` for `descriptor` with legacy (unprefixed, or with `any_case`
    lower-case) enum names replaced by the current ones. Anything that does not fit the
    descriptor is left as it is, for the parser to report.

    >>> from tlm.reward.v1 import evaluator_pb2 as ev
    >>> upgrade_enums({"aggregation": "MIN", "scorers": [{"length": {"unit": "WORDS"}}]},
    ...               ev.EvaluatorSpec.DESCRIPTOR)
    {'aggregation': 'AGGREGATION_MIN', 'scorers': [{'length': {'unit': 'LENGTH_UNIT_WORDS'}}]}
    """
    if not isinstance(data, dict) or descriptor.full_name.startswith("google.protobuf."):
        return data
    fields = {f.name: f for f in descriptor.fields} | {f.json_name: f for f in descriptor.fields}
    out = {}
    for key, value in data.items():
        fdesc = fields.get(key) if isinstance(key, str) else None
        out[key] = value if fdesc is None else _upgrade_field(value, fdesc, any_case)
    return out


def _upgrade_field(value: Any, fdesc: FieldDescriptor, any_case: bool) -> Any:
    if fdesc.message_type is not None and fdesc.message_type.GetOptions().map_entry:
        value_field = fdesc.message_type.fields_by_name["value"]
        if not isinstance(value, dict):
            return value
        return {k: _upgrade_single(v, value_field, any_case) for k, v in value.items()}
    if fdesc.is_repeated:
        if not isinstance(value, list):
            return value
        return [_upgrade_single(v, fdesc, any_case) for v in value]
    return _upgrade_single(value, fdesc, any_case)


def _upgrade_single(value: Any, fdesc: FieldDescriptor, any_case: bool) -> Any:
    if fdesc.message_type is not None:
        return upgrade_enums(value, fdesc.message_type, any_case=any_case)
    enum = fdesc.enum_type
    if enum is not None and isinstance(value, str):
        number = lookup(enum, value, any_case=any_case)
        return value if number is None else enum.values_by_number[number].name
    return value


def parse_dict(
    data: Any, message: M, *, ignore_unknown_fields: bool = False, any_case: bool = False
) -> M:
    """`json_format.ParseDict` that also accepts the enum names of v1.0 (and, with
    `any_case`, lower-case names, for what people type)."""
    descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[assignment]  # upb's is the same
    upgraded = upgrade_enums(data, descriptor, any_case=any_case)
    return json_format.ParseDict(upgraded, message, ignore_unknown_fields=ignore_unknown_fields)


def to_json(message: Message) -> str:
    """A message as people read it in the registry and the CLI: proto3 JSON with the fields'
    proto names, indented (the form of a normalised evaluator spec)."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)


def parse(
    text: str | bytes, message: M, *, ignore_unknown_fields: bool = False, any_case: bool = False
) -> M:
    """`json_format.Parse` with `parse_dict`'s legacy enum names (ParseError on bad JSON too)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise json_format.ParseError(f"Failed to load JSON: {exc}") from exc
    return parse_dict(data, message, ignore_unknown_fields=ignore_unknown_fields, any_case=any_case)
