"""Model revisions: which files a folder must hold, and the facts read from them at upload
(architecture, parameter count, dtype, tokenizer, adapter rank and targets)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2

SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class ModelFilesInvalid(InvalidArgument):
    reason = common_pb2.MODEL_INCOMPATIBLE


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesInvalid(
            f"{path.name} is not valid JSON: {exc}",
            violations=[FieldViolation(f"manifest.files[{path.name}]", "not valid JSON")],
        ) from exc
    if not isinstance(value, dict):
        raise ModelFilesInvalid(f"{path.name} must hold a JSON object")
    return value


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100_000_000:
            raise ModelFilesInvalid(f"{path.name} is not a safetensors file")
        header: dict[str, Any] = json.loads(f.read(size))
    return header


def _count_parameters(folder: Path, pattern: str) -> tuple[int, str]:
    """Parameters and dominant dtype from safetensors headers, without loading weights."""
    total, by_dtype = 0, dict[str, int]()
    for path in sorted(folder.glob(pattern)):
        try:
            header = _safetensors_header(path)
        except (OSError, ValueError, struct.error) as exc:
            raise ModelFilesInvalid(f"{path.name} is not a readable safetensors file") from exc
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(info["shape"])
            total += n
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
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
        chat = bool(_json(folder / "tokenizer_config.json").get("chat_template"))
    return present, chat


def full_weights_metadata(folder: Path) -> registry_pb2.ModelMetadata:
    if not (folder / "config.json").exists():
        raise _missing("a FULL_WEIGHTS revision", "config.json")
    if not list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin")):
        raise _missing("a FULL_WEIGHTS revision", "weights (*.safetensors or *.bin)")
    config = _json(folder / "config.json")
    params, dtype = _count_parameters(folder, "*.safetensors")
    tokenizer, chat = _tokenizer_facts(folder)
    archs = config.get("architectures") or [""]
    return registry_pb2.ModelMetadata(
        architecture=str(archs[0]),
        model_type=str(config.get("model_type", "")),
        parameter_count=params,
        dtype=dtype or str(config.get("dtype") or config.get("torch_dtype") or ""),
        tokenizer_present=tokenizer,
        chat_template_present=chat,
        max_position_embeddings=int(config.get("max_position_embeddings") or 0),
    )


def adapter_metadata(folder: Path) -> registry_pb2.ModelMetadata:
    if not (folder / "adapter_config.json").exists():
        raise _missing("a LORA_ADAPTER revision", "adapter_config.json")
    config = _json(folder / "adapter_config.json")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelFilesInvalid(f"adapter peft_type is {config.get('peft_type')}; expected LORA")
    params, dtype = _count_parameters(folder, "adapter_model.safetensors")
    tokenizer, chat = _tokenizer_facts(folder)
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return registry_pb2.ModelMetadata(
        architecture="LoraAdapter",
        model_type="lora",
        parameter_count=params,
        dtype=dtype,
        tokenizer_present=tokenizer,
        chat_template_present=chat,
        adapter_rank=int(config.get("r", 0)),
        adapter_alpha=float(config.get("lora_alpha", 0)),
        adapter_target_modules=sorted(str(t) for t in targets),
    )
