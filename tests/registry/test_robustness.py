"""Races and hostile input found in review: each was a real defect before its fix."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import struct_pb2

from services.registry.client import folder_manifest
from tests.registry.conftest import A, Registry, dataset_requests, details, unique
from tests.registry.test_models import upload_requests
from tlm.registry.v1 import registry_pb2 as pb


def _row(i: int) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"prompt": f"p{i}", "chosen": "a", "rejected": "b"})
    return s


def test_concurrent_appends_lose_no_rows(registry: Registry) -> None:
    parent = f"datasets/{unique('race')}"

    def append(i: int) -> None:
        registry.stub.AppendDatasetRows(
            pb.AppendDatasetRowsRequest(
                parent=parent, kind=pb.DATASET_KIND_PREFERENCE, rows=[_row(i)]
            ),
            metadata=A,
            timeout=60,
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(append, range(12)))
    latest = registry.stub.GetDatasetRevision(
        pb.GetDatasetRevisionRequest(name=f"{parent}/revisions/latest"), metadata=A
    )
    assert (latest.revision_id, latest.row_count) == ("r12", 12)
    rows = registry.stub.ReadDatasetRows(pb.ReadDatasetRowsRequest(name=latest.name), metadata=A)
    assert sorted(r["prompt"] for b in rows for r in b.rows) == sorted(f"p{i}" for i in range(12))


def test_concurrent_creates_of_one_name(registry: Registry) -> None:
    model_id = unique("same")

    def create(_: int) -> str:
        try:
            registry.stub.CreateModel(pb.CreateModelRequest(model_id=model_id), metadata=A)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(create, range(8)))
    assert outcomes == ["ALREADY_EXISTS"] * 7 + ["OK"]


@pytest.mark.parametrize("alias_path", ["./config.json", "config.json/", "sub/./x", "a//b"])
def test_manifest_paths_must_be_canonical(registry, tiny_model_dir, alias_path: str) -> None:  # type: ignore[no-untyped-def]
    manifest = folder_manifest(tiny_model_dir)
    extra = manifest.files.add()
    extra.CopyFrom(manifest.files[0])
    extra.path = alias_path
    header = pb.ModelRevisionHeader(
        parent=f"models/{unique('alias')}", format=pb.MODEL_FORMAT_FULL_WEIGHTS, manifest=manifest
    )
    with pytest.raises(grpc.RpcError) as err:  # refused on the header alone
        registry.stub.UploadModelRevision(
            iter([pb.UploadModelRevisionRequest(header=header)]), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)[1][0][0] == f"header.manifest.files[{len(manifest.files) - 1}].path"


def test_file_and_folder_of_the_same_path(registry, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    manifest = folder_manifest(tiny_model_dir)
    extra = manifest.files.add()
    extra.CopyFrom(manifest.files[0])
    extra.path = f"{manifest.files[0].path}/inner"
    header = pb.ModelRevisionHeader(
        parent=f"models/{unique('dir')}", format=pb.MODEL_FORMAT_FULL_WEIGHTS, manifest=manifest
    )
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadModelRevision(
            iter([pb.UploadModelRevisionRequest(header=header)]), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_huge_values_in_errors_are_clipped(registry: Registry) -> None:
    data = json.dumps({"prompt": "p", "completion": "c", "label": "x" * 200_000}).encode() + b"\n"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadDatasetRevision(
            dataset_requests(
                f"datasets/{unique('big')}", data, pb.DATASET_KIND_UNPAIRED_PREFERENCE
            ),
            metadata=A,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not a metadata overflow
    (field, description), *_ = details(err.value)[1]
    assert field == "rows[0].label" and len(description) <= 256


def test_binary_metadata_is_ignored(registry: Registry) -> None:
    listed = registry.stub.ListModels(
        pb.ListModelsRequest(), metadata=(*A, ("trace-bin", b"\xff\xfe\x00"))
    )
    assert listed is not None


def test_huge_revision_ids_aliases_and_forged_tokens(registry: Registry, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    name = unique("odd")
    registry.stub.UploadModelRevision(upload_requests(f"models/{name}", tiny_model_dir), metadata=A)
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.GetModelRevision(
            pb.GetModelRevisionRequest(name=f"models/{name}/revisions/r{'9' * 40}"), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for alias, rev in [("", "r1"), ("Prod/x", "r1"), ("LATEST", "r1"), ("prod", "foo")]:
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.SetModelAlias(
                pb.SetModelAliasRequest(name=f"models/{name}", alias=alias, revision_id=rev),
                metadata=A,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, alias
    from services.common.pagination import encode_token

    forged = encode_token("zz", {"parent": f"models/{name}"})
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.ListModelRevisions(
            pb.ListModelRevisionsRequest(parent=f"models/{name}", page_token=forged), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_dataset_header_is_checked_before_the_bytes(registry: Registry) -> None:
    import threading
    import time

    release = threading.Event()

    def requests():  # type: ignore[no-untyped-def]
        header, *_ = dataset_requests("datasets/a/b", b"x", pb.DATASET_KIND_SFT)
        yield header
        release.wait(20)  # the data would only come much later
        yield pb.UploadDatasetRevisionRequest(data=b"x")

    start = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.UploadDatasetRevision(requests(), metadata=A, timeout=30)
    finally:
        release.set()
    assert time.monotonic() - start < 10  # refused without waiting for the bytes
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)[1][0][0] == "header.parent"
