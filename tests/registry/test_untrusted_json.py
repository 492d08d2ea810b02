"""Second security review of the registry: JSON a caller uploads (model configs, safetensors
headers, dataset rows) that Python's json accepts but nothing downstream can store or read —
nesting past the recursion or protobuf depth limits, lone surrogates, NaN, numbers beyond a
double — is INVALID_ARGUMENT naming the file or row, never INTERNAL, and nothing is stored."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
import pytest

from tests.registry.conftest import A, Registry, dataset_requests, details, unique
from tests.registry.test_hardening import ONE_TENSOR, _refused_and_stored_nothing, full_model
from tlm.registry.v1 import registry_pb2 as pb

DEEP = b"[" * 100_000 + b"]" * 100_000


def _header(raw: bytes, data: bytes = b"\0" * 8) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


BAD_MODEL_FILES = {
    "config nested past the recursion limit": ("config.json", b'{"a": ' + DEEP + b"}"),
    "tokenizer_config nested past the recursion limit": ("tokenizer_config.json", DEEP),
    "safetensors header nested past the recursion limit": ("model.safetensors", _header(DEEP)),
    "model_type a lone surrogate": ("config.json", b'{"model_type": "\\ud800"}'),
    "architecture of megabytes": (
        "config.json",
        b'{"architectures": ["' + b"A" * 2_000_000 + b'"]}',
    ),
    "dtype a lone surrogate": (
        "model.safetensors",
        _header(b'{"w": {"dtype": "\\ud800", "shape": [2], "data_offsets": [0, 8]}}'),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODEL_FILES))
def test_model_json_nobody_can_store_is_invalid_argument(
    registry: Registry, tmp_path: Path, case: str
) -> None:
    folder = full_model(tmp_path)
    (folder / "model.safetensors").write_bytes(ONE_TENSOR)
    file, data = BAD_MODEL_FILES[case]
    (folder / file).write_bytes(data + b" " * len(unique("s")))  # a fresh blob each run
    _refused_and_stored_nothing(registry, folder, file)


BAD_ROWS = {
    "nested past the recursion limit": b'{"prompt": "hi", "x": ' + DEEP + b"}",
    "nested past what a Struct can carry": b'{"prompt": "hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}",
    "huge integer": b'{"prompt": "hi", "x": ' + b"9" * 5_000 + b"}",
    "integer beyond a double": b'{"prompt": "hi", "x": ' + b"9" * 400 + b"}",
    "NaN": b'{"prompt": "hi", "x": NaN}',
    "Infinity": b'{"prompt": "hi", "x": -Infinity}',
    "float overflowing to inf": b'{"prompt": "hi", "x": 1e400}',
    "lone surrogate value": b'{"prompt": "\\ud800"}',
    "lone surrogate key": b'{"prompt": "hi", "\\udfff": 1}',
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_dataset_rows_nobody_can_read_are_invalid_argument(registry: Registry, case: str) -> None:
    name = unique("rows")
    registry.stub.CreateDataset(
        pb.CreateDatasetRequest(dataset_id=name, kind=pb.DATASET_KIND_PROMPT), metadata=A
    )
    data = b'{"prompt": "fine"}\n' + BAD_ROWS[case] + b"\n"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadDatasetRevision(
            dataset_requests(f"datasets/{name}", data, pb.DATASET_KIND_PROMPT), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert [f for f, _ in details(err.value)[1]] == ["rows[1]"]
    listed = registry.stub.ListDatasetRevisions(
        pb.ListDatasetRevisionsRequest(parent=f"datasets/{name}"), metadata=A
    )
    assert list(listed.revisions) == []


def test_rows_as_deep_as_allowed_read_back(registry: Registry) -> None:
    name = unique("rows")
    registry.stub.CreateDataset(
        pb.CreateDatasetRequest(dataset_id=name, kind=pb.DATASET_KIND_PROMPT), metadata=A
    )
    nested = b'{"a": ' * 22 + b"[1]" + b"}" * 22  # the row, x and 22 objects: 24 levels
    data = b'{"prompt": "hi", "x": ' + nested + b"}\n"
    revision = registry.stub.UploadDatasetRevision(
        dataset_requests(f"datasets/{name}", data, pb.DATASET_KIND_PROMPT), metadata=A
    )
    rows = [
        row
        for batch in registry.stub.ReadDatasetRows(
            pb.ReadDatasetRowsRequest(name=revision.name), metadata=A
        )
        for row in batch.rows
    ]
    assert len(rows) == 1 and rows[0]["prompt"] == "hi"
