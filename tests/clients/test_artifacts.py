"""Verified downloads: chunks written while the next arrive, every file checked by sha256."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.clients.artifacts import write_download
from services.common.errors import InvalidArgument
from tlm.registry.v1 import registry_pb2

FILES = {"model.bin": bytes(range(256)) * 4000, "sub/config.json": b"{}", "empty.txt": b""}


def manifest(files: dict[str, bytes]) -> registry_pb2.Manifest:
    return registry_pb2.Manifest(
        files=[
            registry_pb2.ArtifactFile(
                path=p, size_bytes=len(d), sha256=hashlib.sha256(d).hexdigest()
            )
            for p, d in files.items()
        ]
    )


async def stream(
    declared: dict[str, bytes], sent: dict[str, bytes], chunk: int = 100_000
) -> AsyncIterator[registry_pb2.DownloadChunk]:
    yield registry_pb2.DownloadChunk(manifest=manifest(declared))
    for path, data in sent.items():
        for offset in range(0, len(data), chunk):
            part = registry_pb2.FileChunk(
                path=path, offset=offset, data=data[offset : offset + chunk]
            )
            yield registry_pb2.DownloadChunk(chunk=part)


def test_every_file_lands_whole_in_many_chunks(tmp_path: Path) -> None:
    got = asyncio.run(write_download(stream(FILES, FILES), tmp_path))
    assert got == manifest(FILES)
    assert {p: (tmp_path / p).read_bytes() for p in FILES} == FILES


def test_a_changed_byte_fails_the_sha256_check(tmp_path: Path) -> None:
    corrupt = dict(FILES, **{"model.bin": FILES["model.bin"][:-1] + b"\x00"})
    with pytest.raises(InvalidArgument, match=r"model\.bin: sha256"):
        asyncio.run(write_download(stream(FILES, corrupt), tmp_path))
