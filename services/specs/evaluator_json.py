"""Structural check of evaluator JSON against the EvaluatorSpec descriptor.

json_format.Parse stops at the first problem and names no path; this walk reports every unknown
field and wrong type with its JSON path (`scorers[2].regex.pattern`) before Parse runs.

It also enforces the size limits, before any expensive work: a spec is data any team may send
with every Score call, and json.loads, json_format and the JSON Schema checks all recurse and
take time in proportion to what they are given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from google.protobuf import duration_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.errors import FieldViolation

F = FieldDescriptor
INT_TYPES = {F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_SINT32}
FLOAT_TYPES = {F.TYPE_DOUBLE, F.TYPE_FLOAT}
FLOAT_WORDS = {"NaN", "Infinity", "-Infinity"}
# Largest magnitude of each integer type; a bigger JSON number would fail json_format's parse
# with no path.
INT_LIMITS = {
    F.TYPE_INT32: 2**31 - 1,
    F.TYPE_SINT32: 2**31 - 1,
    F.TYPE_INT64: 2**63 - 1,
    F.TYPE_UINT32: 2**32 - 1,
    F.TYPE_UINT64: 2**64 - 1,
}

# The size limits of a spec (see the module docstring). Checking a JSON Schema of 2,000 values
# takes up to ~0.4 s of CPU, and 64 KiB hold a few of them: validation stays under ~2 s.
MAX_SPEC_BYTES = 64 * 1024  # the whole spec, as JSON text or as a serialized message
MAX_MESSAGE_DEPTH = 24  # messages inside messages (remote scorers carry inline specs)
MAX_OBJECT_NODES = 2_000  # values in one JSON object field (a json scorer's schema)
MAX_OBJECT_DEPTH = 32  # nesting of one JSON object field
# When json.loads gives up (its C parser raises RecursionError near 1000 levels), arrays and
# objects deeper than this are cut (replaced by null) and it parses again, so the field checks
# can still name the deep field.
PARSE_DEPTH = 128


def join(path: str, key: str | int) -> str:
    """Extend a JSON path.

    >>> join("scorers[2]", "regex"), join("scorers", 2), join("", "gates")
    ('scorers[2].regex', 'scorers[2]', 'gates')
    """
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def load_json(text: str) -> tuple[Any, list[FieldViolation]]:
    """The parsed spec JSON, or why not: too big, or not JSON."""
    size = len(text.encode())
    if size > MAX_SPEC_BYTES:
        limit = MAX_SPEC_BYTES // 1024
        return None, [
            FieldViolation("$", f"the spec is {size / 1024:.0f} KiB; at most {limit} KiB")
        ]
    try:
        try:
            return json.loads(text), []
        except RecursionError:
            return json.loads(cut_nesting(text, PARSE_DEPTH)), []
    except json.JSONDecodeError as exc:
        return None, [FieldViolation("$", f"not JSON: {exc.msg} at line {exc.lineno}")]


def cut_nesting(text: str, limit: int) -> str:
    """`text` with every array or object nested deeper than `limit` replaced by null (linear,
    no recursion; only run when json.loads gave up).

    >>> cut_nesting('{"a": [[["x]"]]], "b": 1}', 2)
    '{"a": [null], "b": 1}'
    """
    kept, depth, resume = [], 0, 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth == limit + 1:
                kept.append(text[resume:i] + "null")
        elif ch in "]}":
            if depth == limit + 1:
                resume = i + 1
            depth -= 1
    kept.append(text[resume:] if depth <= limit else "")
    return "".join(kept)


def prune_message(
    value: Any, descriptor: Descriptor, path: str, depth: int = 0
) -> tuple[list[FieldViolation], dict[str, Any]]:
    """The structural problems, and a copy of `value` without the offending entries (so the
    semantic checks can still run on the rest and report their errors too)."""
    if not isinstance(value, dict):
        return [FieldViolation(path or "$", f"expected an object, got {_kind(value)}")], {}
    if depth > MAX_MESSAGE_DEPTH:
        return [FieldViolation(path, f"nested deeper than {MAX_MESSAGE_DEPTH} messages")], {}
    errors: list[FieldViolation] = []
    kept: dict[str, Any] = {}
    by_name = {f.name: f for f in descriptor.fields} | {f.json_name: f for f in descriptor.fields}
    oneofs_seen: dict[str, str] = {}
    for key, item in value.items():
        where = join(path, key)
        fdesc = by_name.get(key)
        if fdesc is None:
            errors.append(FieldViolation(where, _unknown_field(descriptor, item)))
            continue
        oneof = fdesc.containing_oneof
        if oneof is not None and item is not None:
            if oneof.name in oneofs_seen:
                errors.append(
                    FieldViolation(
                        where, f"only one of {oneof.name} may be set; {oneofs_seen[oneof.name]} is"
                    )
                )
                continue
            oneofs_seen[oneof.name] = fdesc.name
        if item is None:
            continue
        field_errors, cleaned = _check_field(item, fdesc, where, depth)
        errors.extend(field_errors)
        if cleaned is not _DROP:
            kept[key] = cleaned
    return errors, kept


_DROP = object()


def _unknown_field(descriptor: Descriptor, item: Any) -> str:
    scorer = descriptor.oneofs_by_name.get("scorer")
    if scorer is not None and isinstance(item, dict):
        types = ", ".join(f.name for f in scorer.fields)
        return f"unknown scorer type; expected one of: {types}"
    return f"unknown field; expected one of: {', '.join(f.name for f in descriptor.fields)}"


def _check_field(
    value: Any, fdesc: FieldDescriptor, path: str, depth: int
) -> tuple[list[FieldViolation], Any]:
    if not fdesc.is_repeated:
        return _check_single(value, fdesc, path, depth)
    if not isinstance(value, list):
        return [FieldViolation(path, f"expected a list, got {_kind(value)}")], _DROP
    errors: list[FieldViolation] = []
    kept = []
    for i, item in enumerate(value):
        item_errors, cleaned = _check_single(item, fdesc, join(path, i), depth)
        errors.extend(item_errors)
        # Keep list positions stable so later paths still name the right index.
        kept.append(cleaned if cleaned is not _DROP else _placeholder(fdesc))
    return errors, kept


def _placeholder(fdesc: FieldDescriptor) -> Any:
    return {} if fdesc.type == F.TYPE_MESSAGE else fdesc.default_value


def _check_single(
    value: Any, fdesc: FieldDescriptor, path: str, depth: int
) -> tuple[list[FieldViolation], Any]:
    if fdesc.type == F.TYPE_MESSAGE:
        checker = WELL_KNOWN.get(msg_type(fdesc).full_name)
        if checker is None:
            return prune_message(value, msg_type(fdesc), path, depth + 1)
        problem = checker(value)
    elif fdesc.type == F.TYPE_ENUM:
        names = enum_names(fdesc)
        ok = value in names or (isinstance(value, int) and not isinstance(value, bool))
        problem = None if ok else f"expected one of {', '.join(names)}, got {value!r}"
    else:
        problem = SCALARS[_scalar_kind(fdesc.type)](value) or _int_range(value, fdesc.type)
    if problem:
        return [FieldViolation(path, problem)], _DROP
    return [], value


def _scalar_kind(ftype: int) -> str:
    if ftype in INT_TYPES:
        return "integer"
    if ftype in FLOAT_TYPES:
        return "number"
    return "boolean" if ftype == F.TYPE_BOOL else "string"


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    for cls, name in names.items():
        if isinstance(value, cls):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _integer(value: Any) -> str | None:
    if isinstance(value, bool):
        return "expected an integer, got a boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return None
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return None
    return f"expected an integer, got {_kind(value)} {value!r}"


def _int_range(value: Any, ftype: int) -> str | None:
    """Why an integer (already checked by `_integer`) does not fit its field's type, or None."""
    limit = INT_LIMITS.get(ftype)
    if limit is None:
        return None
    number = int(value) if isinstance(value, int | str) else int(float(value))
    low = 0 if ftype in (F.TYPE_UINT32, F.TYPE_UINT64) else -limit - 1
    return None if low <= number <= limit else f"out of range of its integer type [{low}, {limit}]"


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return f"expected a number, got {_kind(value)}"
    if isinstance(value, str):
        if value in FLOAT_WORDS:
            return None
        try:
            float(value)
        except ValueError:
            return f"expected a number, got the string {value!r}"
    return None


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_kind(value)}"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else f"expected a string, got {_kind(value)}"


def _duration(value: Any) -> str | None:
    if not isinstance(value, str):
        return f'expected a duration string such as "1.5s", got {_kind(value)}'
    try:
        duration_pb2.Duration().FromJsonString(value)
    except ValueError:
        return f'expected a duration string such as "1.5s", got {value!r}'
    return None


def _struct(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"expected an object, got {_kind(value)}"
    return object_extent_problem(value)


def object_extent_problem(value: Any) -> str | None:
    """Why a JSON object field (a json scorer's schema) is too big to check cheaply, or None.

    Iterative, and stops at the limits, so a huge or deep value costs little to refuse.

    >>> object_extent_problem({"type": "object", "properties": {"a": {"type": "string"}}})
    >>> deep = {}
    >>> for _ in range(40):
    ...     deep = {"items": deep}
    >>> object_extent_problem(deep)
    'nested deeper than 32 levels'
    """
    nodes, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_OBJECT_NODES:
            return f"has more than {MAX_OBJECT_NODES} values (keys' values and list items)"
        if isinstance(item, dict | list):
            if depth > MAX_OBJECT_DEPTH:
                return f"nested deeper than {MAX_OBJECT_DEPTH} levels"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def msg_type(fdesc: Any) -> Descriptor:
    """The message type of a message field (typed, for mypy)."""
    descriptor: Descriptor = fdesc.message_type
    return descriptor


def enum_names(fdesc: Any) -> list[str]:
    return [v.name for v in fdesc.enum_type.values]


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


SCALARS: dict[str, Callable[[Any], str | None]] = {
    "integer": _integer,
    "number": _number,
    "boolean": _boolean,
    "string": _string,
}
WELL_KNOWN: dict[str, Callable[[Any], str | None]] = {
    "google.protobuf.Duration": _duration,
    "google.protobuf.Struct": _struct,
}
