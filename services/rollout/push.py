"""Pushed policy weights: the header and tensor pieces of a PushWeights stream as domain types,
reassembled into tensors. The trainer side (`services/trainer/rl/weight_sync.py`) cuts them with
`tensor_pieces`. No grpc here.

A tensor travels as its raw little-endian bytes (what safetensors stores) in pieces of at most
`PIECE_BYTES`, in order; the version it makes is `{policy}@step-{step}`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import torch

from services.rollout.domain import invalid

PIECE_BYTES = 3 << 20  # 3 MiB of data per message: under gRPC's 4 MiB cap with the header
VERSION_SEPARATOR = "@step-"
MAX_POLICY_CHARS = 200
# safetensors' dtype names; only floating weights are pushed.
DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class PushHeader:
    policy: str
    step: int
    base_model_revision: str
    lora: bool  # an adapter (else full weights)
    adapter_config_json: str
    tensor_count: int

    @property
    def version(self) -> str:
        return policy_version(self.policy, self.step)

    def check(self) -> None:
        if not self.policy or VERSION_SEPARATOR[0] in self.policy:
            raise invalid("header.policy", "is required and may not contain '@'")
        if len(self.policy) > MAX_POLICY_CHARS:
            raise invalid("header.policy", f"is longer than {MAX_POLICY_CHARS} characters")
        if self.step < 1:
            raise invalid("header.step", "must be >= 1")
        if not self.base_model_revision:
            raise invalid("header.base_model_revision", "is required")
        if self.lora and not self.adapter_config_json:
            raise invalid("header.adapter_config_json", "is required for an adapter")
        if self.tensor_count < 1:
            raise invalid("header.tensor_count", "must be >= 1")


@dataclass(frozen=True)
class TensorPiece:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    data: bytes


def policy_version(policy: str, step: int) -> str:
    return f"{policy}{VERSION_SEPARATOR}{step}"


def is_pushed_version(name: str) -> bool:
    return VERSION_SEPARATOR in name


def tensor_pieces(name: str, tensor: torch.Tensor) -> Iterator[TensorPiece]:
    """A tensor's bytes, in pieces of at most PIECE_BYTES (one piece for an empty tensor)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    shape = tuple(tensor.shape)
    dtype = DTYPE_NAMES[tensor.dtype]
    for offset in range(0, max(len(raw), 1), PIECE_BYTES):
        yield TensorPiece(name, dtype, shape, offset, raw[offset : offset + PIECE_BYTES])


async def assemble(pieces: AsyncIterator[TensorPiece], expected: int) -> dict[str, torch.Tensor]:
    """The tensors of a stream, each whole and in order; INVALID_ARGUMENT naming the field when
    a piece does not follow (another dtype or shape mid-tensor, a gap, a tensor cut short)."""
    out: dict[str, torch.Tensor] = {}
    current: TensorPiece | None = None
    buffer = bytearray()
    async for piece in pieces:
        if current is None or piece.name != current.name:
            if current is not None:
                out[current.name] = _finish(current, buffer)
            if piece.name in out:
                raise invalid("chunk.name", f"{piece.name} was sent twice")
            if piece.dtype not in DTYPES:
                raise invalid(
                    "chunk.dtype", f"expected one of {sorted(DTYPES)}, got {piece.dtype!r}"
                )
            current, buffer = piece, bytearray()
        elif (piece.dtype, piece.shape) != (current.dtype, current.shape):
            raise invalid("chunk.shape", f"{piece.name} changed dtype or shape mid-tensor")
        if piece.offset != len(buffer):
            raise invalid("chunk.offset", f"{piece.name}: expected offset {len(buffer)}")
        buffer += piece.data
    if current is not None:
        out[current.name] = _finish(current, buffer)
    if len(out) != expected:
        raise invalid("header.tensor_count", f"{expected} tensors announced, {len(out)} received")
    return out


def _finish(piece: TensorPiece, buffer: bytearray) -> torch.Tensor:
    dtype = DTYPES[piece.dtype]
    size = math.prod(piece.shape) * torch.empty((), dtype=dtype).element_size()
    if len(buffer) != size:
        raise invalid("chunk.data", f"{piece.name}: {len(buffer)} bytes for {size}")
    if not size:
        return torch.empty(piece.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(piece.shape)
