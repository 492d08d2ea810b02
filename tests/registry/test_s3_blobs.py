"""The S3 blob store against a real S3-compatible server on loopback (moto's server)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import grpc
import pytest

from services.registry.blobs import S3BlobStore, open_blob_store
from tests.registry.conftest import A, start_registry
from tests.registry.test_models import download, upload_requests
from tlm.registry.v1 import registry_pb2 as pb
from tlm.registry.v1 import registry_pb2_grpc


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="tlm")
    yield endpoint
    server.stop()


def test_put_read_exists_delete(s3_endpoint: str, tmp_path: Path) -> None:
    store = open_blob_store("s3://tlm/blobs", tmp_path / "staging", s3_endpoint)
    assert isinstance(store, S3BlobStore)
    staged = tmp_path / "staging" / "x"
    staged.write_bytes(b"hello" * 1000)
    assert not store.exists("k1")
    store.put(staged, "k1")
    assert not staged.exists() and store.exists("k1")
    assert b"".join(store.read("k1", chunk_size=7)) == b"hello" * 1000
    store.delete("k1")
    assert not store.exists("k1")


def test_registry_round_trip_on_s3(s3_endpoint: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    server = start_registry(
        tmp_path / "data", None, blob_url="s3://tlm/registry", s3_endpoint_url=s3_endpoint
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            rev = stub.UploadModelRevision(upload_requests("models/s3", tiny_model_dir), metadata=A)
            keys = {
                o["Key"]
                for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
                    Bucket="tlm", Prefix="registry/"
                )["Contents"]
            }
            assert keys == {f"registry/{f.sha256}" for f in rev.manifest.files}
            registry = type("R", (), {"stub": stub})
            download(registry, rev.name, tmp_path / "out")  # type: ignore[arg-type]
            for f in rev.manifest.files:
                assert (tmp_path / "out" / f.path).read_bytes() == (
                    tiny_model_dir / f.path
                ).read_bytes()
            assert (
                stub.GetModel(pb.GetModelRequest(name="models/s3"), metadata=A).latest_revision_id
                == "r1"
            )
    finally:
        server.stop()
