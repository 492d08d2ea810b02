"""Dataset validation: every row checked against its kind, errors collected with row and field,
and the rows rewritten as canonical JSONL with a schema and length statistics.

Pure domain code: a staged input file in, a staged canonical file and facts out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common import proto_json
from services.common.errors import FieldViolation, InvalidArgument
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2

ROLES = frozenset({"system", "user", "assistant", "tool"})
Check = Callable[[dict[str, Any]], list[tuple[str, str]]]


class DatasetRowsInvalid(InvalidArgument):
    reason = common_pb2.DATASET_ROWS_INVALID


def _messages_problem(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of {role, content} messages"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with a string 'content'"
        if m.get("role") not in ROLES:
            return f"message {i} has role {m.get('role')!r}; expected one of {sorted(ROLES)}"
    return None


def _text_or_messages(row: dict[str, Any], col: str, errors: list[tuple[str, str]]) -> None:
    value = row.get(col)
    if isinstance(value, str):
        if not value.strip():
            errors.append((col, "must not be empty"))
    elif isinstance(value, list):
        problem = _messages_problem(value)
        if problem:
            errors.append((col, problem))
    elif col in row:
        errors.append((col, f"must be a string or a list of messages, got {type(value).__name__}"))


def _needs(row: dict[str, Any], kind: str, columns: tuple[str, ...]) -> list[tuple[str, str]]:
    missing = [c for c in columns if c not in row or row[c] is None]
    if not missing:
        return []
    have = ", ".join(sorted(row)) or "none"
    why = f"kind {kind} needs columns {', '.join(columns)}; this row has {have}"
    return [(c, f"missing: {why}") for c in missing]


def check_sft(row: dict[str, Any]) -> list[tuple[str, str]]:
    if "messages" in row:
        problem = _messages_problem(row["messages"])
        if problem:
            return [("messages", problem)]
        if not any(m["role"] == "assistant" for m in row["messages"]):
            return [("messages", "needs at least one assistant message to learn from")]
        return []
    errors = _needs(row, "sft", ("prompt", "completion"))
    if errors:
        errors[0] = (errors[0][0], errors[0][1] + " (or a 'messages' column)")
        return errors
    for col in ("prompt", "completion"):
        _text_or_messages(row, col, errors)
    return errors


def check_preference(row: dict[str, Any]) -> list[tuple[str, str]]:
    errors = _needs(row, "preference", ("prompt", "chosen", "rejected"))
    if errors:
        return errors
    for col in ("prompt", "chosen", "rejected"):
        _text_or_messages(row, col, errors)
    return errors


def check_unpaired(row: dict[str, Any]) -> list[tuple[str, str]]:
    errors = _needs(row, "unpaired_preference", ("prompt", "completion", "label"))
    if errors:
        return errors
    for col in ("prompt", "completion"):
        _text_or_messages(row, col, errors)
    if not isinstance(row["label"], bool):
        errors.append(("label", f"must be a boolean (true/false), got {row['label']!r}"))
    return errors


def check_prompt(row: dict[str, Any]) -> list[tuple[str, str]]:
    errors = _needs(row, "prompt", ("prompt",))
    if errors:
        return errors
    _text_or_messages(row, "prompt", errors)
    ref = row.get("reference")
    if ref is not None and not isinstance(ref, str | int | float):
        errors.append(("reference", f"must be a string or number, got {type(ref).__name__}"))
    return errors


CHECKS: dict[int, Check] = {
    registry_pb2.DATASET_KIND_SFT: check_sft,
    registry_pb2.DATASET_KIND_PREFERENCE: check_preference,
    registry_pb2.DATASET_KIND_UNPAIRED_PREFERENCE: check_unpaired,
    registry_pb2.DATASET_KIND_PROMPT: check_prompt,
}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "messages" if value and _messages_problem(value) is None else "array"
    return "object"


def _text_length(value: Any) -> int | None:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list) and value and _messages_problem(value) is None:
        return sum(len(m["content"]) for m in value)
    return None


@dataclass
class DatasetFacts:
    row_count: int = 0
    sha256: str = ""
    size_bytes: int = 0
    types: dict[str, set[str]] = field(default_factory=dict)
    present: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=dict)

    def observe(self, row: dict[str, Any]) -> None:
        self.row_count += 1
        for col, value in row.items():
            if value is None:
                continue
            self.types.setdefault(col, set()).add(_json_type(value))
            self.present[col] = self.present.get(col, 0) + 1
            n = _text_length(value)
            if n is not None:
                self.lengths.setdefault(col, []).append(n)

    def columns(self) -> list[registry_pb2.Column]:
        return [
            registry_pb2.Column(
                name=col,
                type=next(iter(types)) if len(types) == 1 else "mixed",
                present_count=self.present[col],
            )
            for col, types in self.types.items()
        ]

    def length_stats(self) -> dict[str, registry_pb2.LengthStats]:
        out = {}
        for col, values in self.lengths.items():
            v = sorted(values)

            def pct(q: float, v: list[int] = v) -> int:
                return v[min(len(v) - 1, int(q * len(v)))]

            out[col] = registry_pb2.LengthStats(
                min=v[0],
                p50=pct(0.5),
                p90=pct(0.9),
                p99=pct(0.99),
                max=v[-1],
                mean=sum(v) / len(v),
            )
        return out


def iter_jsonl(path: Path, max_row_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value or None, problem or None) for each non-blank line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > max_row_bytes:
                yield lineno, None, f"line is {len(raw)} bytes, over the {max_row_bytes} limit"
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not UTF-8 text (bad byte at offset {exc.start})"
                continue
            if not text.strip():
                continue
            try:
                value = parse_row(text)
            except json.JSONDecodeError as exc:
                yield lineno, None, f"not JSON: {exc.msg} at column {exc.colno}"
            except RecursionError:
                yield lineno, None, "not JSON: nested too deeply"
            except ValueError as exc:  # NaN, Infinity, a huge integer, a lone surrogate
                yield lineno, None, f"not JSON: {str(exc)[:120]}"
            else:
                yield lineno, value, None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of the range of a double")
    return value


# Readers get each row as a google.protobuf.Struct, and protobuf refuses to parse messages
# nested past 100 levels (an object level is three: Struct, map entry, Value); a row nested
# deeper than this would be stored but could never be read back.
MAX_ROW_DEPTH = 24


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > 308:
        raise ValueError(f"{text[:40]}... is out of the range of a double")
    return int(text)


def parse_row(text: str) -> Any:
    """One JSONL row as strict JSON: no NaN or Infinity (nor numbers that overflow a double),
    since readers get rows as protobuf Structs and JSON; no nesting past MAX_ROW_DEPTH; no
    lone surrogates ("\\ud800"), which cannot be stored as UTF-8. ValueError (or RecursionError)
    otherwise.

    >>> parse_row('{"a": [1, 2.5, "x"]}')
    {'a': [1, 2.5, 'x']}
    >>> parse_row('{"a": NaN}')
    Traceback (most recent call last):
    ...
    ValueError: NaN is not JSON
    """
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite, parse_int=_integer)
    if text.count("[") + text.count("{") > MAX_ROW_DEPTH and _too_deep(value, MAX_ROW_DEPTH):
        raise ValueError(f"nested deeper than {MAX_ROW_DEPTH} levels")
    if "\\u" in text:  # only an escape can make a lone surrogate
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate (not valid Unicode)") from None
    return value


def iter_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidArgument(f"file is not Parquet: {exc}") from exc
    lineno = 0
    for batch in reader.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            lineno += 1
            yield lineno, row, None


def validate_file(
    src: Path,
    fmt: int,
    kind: int,
    out: Path,
    *,
    max_row_bytes: int,
    max_errors: int,
) -> DatasetFacts:
    """Validate `src` row by row and write canonical JSONL to `out`.

    Raises DatasetRowsInvalid naming up to `max_errors` bad rows (`rows[i].field`) when any row
    is invalid, and InvalidArgument when the file holds no rows.
    """
    check = CHECKS.get(kind)
    if check is None:
        raise InvalidArgument(f"kind {kind} is not a dataset kind")
    rows = (
        iter_parquet(src)
        if fmt == registry_pb2.DATASET_FORMAT_PARQUET
        else iter_jsonl(src, max_row_bytes)
    )
    facts, digest = DatasetFacts(), hashlib.sha256()
    violations: list[FieldViolation] = []
    bad_rows = 0
    with out.open("wb") as sink:
        for index, (lineno, value, problem) in enumerate(rows):
            errors: list[tuple[str, str]]
            if problem is not None:
                errors = [("", problem)]
            elif not isinstance(value, dict):
                errors = [("", f"must be a JSON object, got {type(value).__name__}")]
            else:
                errors = check(value)
            if errors:
                bad_rows += 1
                for col, msg in errors:
                    if len(violations) < max_errors:
                        path = f"rows[{index}].{col}" if col else f"rows[{index}]"
                        violations.append(FieldViolation(path, f"line {lineno}: {msg}"))
                continue
            if bad_rows:
                facts.row_count += 1  # keep counting for the message; nothing will be kept
                continue
            line = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
            line_bytes = line.encode() + b"\n"
            sink.write(line_bytes)
            digest.update(line_bytes)
            facts.size_bytes += len(line_bytes)
            facts.observe(value)
    total = facts.row_count + bad_rows
    if bad_rows:
        kind_name = proto_json.short_name(registry_pb2.DatasetKind, kind).lower()
        raise DatasetRowsInvalid(
            f"{bad_rows} of {total} rows are invalid for kind {kind_name}; nothing was stored. "
            f"First: {violations[0].field}: {violations[0].description}",
            violations=violations,
            metadata={"invalid_rows": str(bad_rows), "rows": str(total)},
        )
    if total == 0:
        raise InvalidArgument(
            "the file holds no rows", violations=[FieldViolation("data", "empty")]
        )
    facts.sha256 = digest.hexdigest()
    return facts
