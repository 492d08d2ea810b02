"""Model revisions: which files a folder must hold, and the facts read from them at upload
(architecture, parameter count, dtype, tokenizer, adapter rank and targets).

The files come from the caller, so every value read is checked for its type and range, and a
bad one is INVALID_ARGUMENT naming the file and the key: nothing is stored for it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

from services.common.errors import FieldViolation, InvalidArgument
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# Bytes per element, to check a safetensors header against its file (other dtypes: >= 1 bit).
DTYPE_BYTES = {
    **{d: 8 for d in ("F64", "I64", "U64")},
    **{d: 4 for d in ("F32", "I32", "U32")},
    **{d: 2 for d in ("F16", "BF16", "I16", "U16")},
    **{d: 1 for d in ("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2")},
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_JSON_BYTES = 64 * 1024 * 1024  # configs are small; a huge one is not read into memory
MAX_DIMS = 16
INT32_MAX = 2**31 - 1  # the metadata fields that hold these counts are int32
# Names read into the metadata (architecture, model type, dtype, target modules) are short.
MAX_NAME_CHARS = 256


def _name(value: Any) -> bool:
    """A string that fits the metadata: short, and valid Unicode (JSON's "\\ud800" escape makes
    a lone surrogate, which protobuf refuses to store)."""
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


# What a config value must be, by the words an error uses for it.
EXPECTED: dict[str, Callable[[Any], bool]] = {
    "an integer": lambda v: type(v) is int,
    "a number": lambda v: type(v) in (int, float) and math.isfinite(v),
    "a string": _name,
    "a list of strings": lambda v: isinstance(v, list) and all(_name(x) for x in v),
    "a string or a list of strings": lambda v: (
        EXPECTED["a string"](v) or EXPECTED["a list of strings"](v)
    ),
}


class ModelFilesInvalid(InvalidArgument):
    reason = common_pb2.MODEL_INCOMPATIBLE


def _invalid(file: str, problem: str) -> ModelFilesInvalid:
    return ModelFilesInvalid(
        f"{file}: {problem}",
        violations=[FieldViolation(f"header.manifest.files[{file}]", problem)],
    )


def _json(folder: Path, file: str) -> dict[str, Any]:
    path = folder / file
    if path.stat().st_size > MAX_JSON_BYTES:
        raise _invalid(file, f"larger than {MAX_JSON_BYTES} bytes")
    try:
        value = json.loads(path.read_bytes())
    except ValueError as exc:  # bad JSON, bad UTF-8, or an integer of thousands of digits
        raise _invalid(file, f"not valid JSON: {str(exc)[:120]}") from exc
    except RecursionError:
        raise _invalid(file, "not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise _invalid(file, "must hold a JSON object")
    return value


def _fact(config: dict[str, Any], file: str, key: str, expected: str, default: Any) -> Any:
    """`config[key]` if it is what `expected` says (absent or null: `default`)."""
    value = config.get(key)
    if value is None:
        return default
    if not EXPECTED[expected](value):
        raise _invalid(file, f"{key}: expected {expected}")
    return value


def _count(config: dict[str, Any], file: str, key: str) -> int:
    value: int = _fact(config, file, key, "an integer", 0)
    if not 0 <= value <= INT32_MAX:
        raise _invalid(file, f"{key}: must be in [0, {INT32_MAX}]")
    return value


def _safetensors_header(folder: Path, file: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the size of the data after it."""
    size = (folder / file).stat().st_size
    with (folder / file).open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _invalid(file, "not a safetensors file: shorter than 8 bytes")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _invalid(file, f"not a safetensors file: a header of {length} bytes")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise _invalid(file, "not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise _invalid(file, "not a safetensors file: the header is not a JSON object")
    return header, size - 8 - length


def _sizes(value: Any, lengths: range) -> TypeGuard[list[int]]:
    """A list of non-negative integers, as many as `lengths` allows."""
    return (
        isinstance(value, list)
        and len(value) in lengths
        and all(type(v) is int and v >= 0 for v in value)
    )


def _tensor(file: str, name: str, info: Any, data_bytes: int) -> tuple[int, str]:
    """(elements, dtype) of one header entry, checked against the bytes the file holds."""
    if not isinstance(info, dict) or not _name(info.get("dtype")):
        raise _invalid(file, f"tensor {name[:80]!r}: needs a dtype")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (
        _sizes(shape, range(MAX_DIMS + 1))
        and _sizes(offsets, range(2, 3))
        and offsets[0] <= offsets[1] <= data_bytes
    ):
        raise _invalid(file, f"tensor {name[:80]!r}: needs a shape and data_offsets in the file")
    elements, span = math.prod(shape), offsets[1] - offsets[0]
    width = DTYPE_BYTES.get(info["dtype"])
    if (width is not None and elements * width != span) or elements > 8 * span:
        raise _invalid(file, f"tensor {name[:80]!r}: shape {shape} does not fit {span} bytes")
    return elements, info["dtype"]


def _count_parameters(folder: Path, pattern: str) -> tuple[int, str]:
    """Parameters and dominant dtype from safetensors headers, without loading weights."""
    total, by_dtype = 0, dict[str, int]()
    for path in sorted(folder.glob(pattern)):
        file = path.relative_to(folder).as_posix()
        header, data_bytes = _safetensors_header(folder, file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n, dtype = _tensor(file, name, info, data_bytes)
            total += n
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    dtype = max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else ""
    return total, SAFETENSORS_DTYPES.get(dtype, dtype.lower())


def _missing(what: str, needs: str) -> ModelFilesInvalid:
    return ModelFilesInvalid(
        f"{what} needs {needs}",
        violations=[FieldViolation("header.manifest.files", f"missing {needs}")],
    )


def _tokenizer_facts(folder: Path) -> tuple[bool, bool]:
    present = (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()
    chat = (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists()
    if not chat and (folder / "tokenizer_config.json").exists():
        chat = bool(_json(folder, "tokenizer_config.json").get("chat_template"))
    return present, chat


def full_weights_metadata(folder: Path) -> registry_pb2.ModelMetadata:
    if not (folder / "config.json").exists():
        raise _missing("a FULL_WEIGHTS revision", "config.json")
    if not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin")):
        raise _missing("a FULL_WEIGHTS revision", "weights (*.safetensors or *.bin)")
    file = "config.json"
    config = _json(folder, file)
    params, dtype = _count_parameters(folder, "*.safetensors")
    tokenizer, chat = _tokenizer_facts(folder)
    archs = _fact(config, file, "architectures", "a list of strings", []) or [""]
    config_dtype = _fact(config, file, "dtype", "a string", "") or _fact(
        config, file, "torch_dtype", "a string", ""
    )
    return registry_pb2.ModelMetadata(
        architecture=archs[0],
        model_type=_fact(config, file, "model_type", "a string", ""),
        parameter_count=params,
        dtype=dtype or config_dtype,
        tokenizer_present=tokenizer,
        chat_template_present=chat,
        max_position_embeddings=_count(config, file, "max_position_embeddings"),
    )


def adapter_metadata(folder: Path) -> registry_pb2.ModelMetadata:
    if not (folder / "adapter_config.json").exists():
        raise _missing("a LORA_ADAPTER revision", "adapter_config.json")
    file = "adapter_config.json"
    config = _json(folder, file)
    peft_type = _fact(config, file, "peft_type", "a string", "LORA")
    if peft_type.upper() != "LORA":
        raise _invalid(file, f"peft_type: {peft_type[:80]!r}; expected LORA")
    params, dtype = _count_parameters(folder, "adapter_model.safetensors")
    tokenizer, chat = _tokenizer_facts(folder)
    targets = _fact(config, file, "target_modules", "a string or a list of strings", [])
    alpha = _fact(config, file, "lora_alpha", "a number", 0)
    if not 0 <= alpha <= INT32_MAX:
        raise _invalid(file, f"lora_alpha: must be in [0, {INT32_MAX}]")
    return registry_pb2.ModelMetadata(
        architecture="LoraAdapter",
        model_type="lora",
        parameter_count=params,
        dtype=dtype,
        tokenizer_present=tokenizer,
        chat_template_present=chat,
        adapter_rank=_count(config, file, "r"),
        adapter_alpha=float(alpha),
        adapter_target_modules=sorted([targets] if isinstance(targets, str) else targets),
    )
