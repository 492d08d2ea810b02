"""Registry fixtures: one real server per database backend (SQLite, PostgreSQL), API keys for
two teams, and small helpers that speak the raw gRPC contract as any client would."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from services.devtools.server_thread import ServerThread
from services.registry.app import binding
from services.registry.settings import RegistrySettings
from tests.rpc_details import rpc_details
from tlm.registry.v1 import registry_pb2 as pb
from tlm.registry.v1 import registry_pb2_grpc

KEYS = {"key-a": "team-a", "key-b": "team-b"}
A = (("authorization", "Bearer key-a"),)
B = (("authorization", "Bearer key-b"),)


def postgres_url() -> str | None:
    url = os.environ.get("TLM_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("TLM_REQUIRE_POSTGRES"):
            pytest.fail("TLM_REQUIRE_POSTGRES is set but TLM_TEST_POSTGRES_URL is not")
        pytest.skip("no PostgreSQL: set TLM_TEST_POSTGRES_URL (.ci/run does)")
    return url


def fresh_postgres_database(url: str) -> str:
    """A new empty database on the server at `url`, so runs never see each other's rows."""
    from sqlalchemy import create_engine, text

    name = f"tlm_test_{secrets.token_hex(4)}"
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


@dataclass
class Registry:
    server: ServerThread
    stub: registry_pb2_grpc.RegistryServiceStub
    backend: str
    data_dir: Path


def start_registry(data_dir: Path, database_url: str | None, **extra: object) -> ServerThread:
    settings = RegistrySettings(
        port=0,
        data_dir=data_dir,
        api_keys=KEYS,
        database_url=database_url,
        **extra,  # type: ignore[arg-type]
    )
    return ServerThread(lambda: [binding(settings)], settings).start()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    url = None
    if request.param == "postgres":
        url = fresh_postgres_database(postgres_url() or "")
    data_dir = tmp_path_factory.mktemp(f"registry-{request.param}")
    server = start_registry(data_dir, url)
    channel = grpc.insecure_channel(server.address)
    yield Registry(server, registry_pb2_grpc.RegistryServiceStub(channel), request.param, data_dir)
    channel.close()
    server.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def details(err: grpc.RpcError) -> tuple[str, list[tuple[str, str]]]:
    """(ErrorInfo reason, [(field, description)]) from an error's google.rpc details."""
    found = rpc_details(err)
    return found.reason, found.violations


def dataset_requests(
    parent: str,
    data: bytes,
    kind: int,
    *,
    fmt: int = pb.DATASET_FORMAT_JSONL,
    sha: str | None = None,
    size: int | None = None,
    request_id: str = "",
    chunk: int = 64 * 1024,
    cut: int | None = None,
):  # type: ignore[no-untyped-def]
    header = pb.DatasetRevisionHeader(
        parent=parent,
        kind=kind,  # type: ignore[arg-type]
        format=fmt,  # type: ignore[arg-type]
        request_id=request_id,
        size_bytes=len(data) if size is None else size,
        sha256=hashlib.sha256(data).hexdigest() if sha is None else sha,
    )
    yield pb.UploadDatasetRevisionRequest(header=header)
    body = data if cut is None else data[:cut]
    for i in range(0, len(body), chunk):
        yield pb.UploadDatasetRevisionRequest(data=body[i : i + chunk])
