"""RegistryClient uploads read each file once: blocks are hashed as they are sent and the file's
sha256 rides on its last chunk; the registry stores the digests it verified. Lists page through
every collection."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
from pathlib import Path

import pytest

from services.clients.artifacts import CHUNK, hashed_blocks, keep_transfer_buffers, sha256_file
from services.clients.registry import RegistryClient
from tests.clients.conftest import registry
from tlm.registry.v1 import registry_pb2

PAGE = resource.getpagesize()


def test_only_the_last_block_carries_the_digest(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK + 7)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    blocks = list(hashed_blocks(path, len(data)))
    assert [len(b) for b, _ in blocks] == [CHUNK, CHUNK, 7]
    assert [d for _, d in blocks] == ["", "", hashlib.sha256(data).hexdigest()]
    assert b"".join(b for b, _ in blocks) == data


def test_a_file_that_changed_size_sends_what_was_declared_or_no_digest(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abcdef")
    assert list(hashed_blocks(path, 4)) == [(b"abcd", hashlib.sha256(b"abcd").hexdigest())]
    # Shorter than declared: no digest, so the registry reports the file incomplete.
    assert list(hashed_blocks(path, 10)) == [(b"abcdef", "")]
    assert list(hashed_blocks(path, 0)) == []


def test_upload_stores_the_digests_computed_while_sending(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = registry(tmp_path / "data")

    async def scenario() -> tuple[dict[str, str], list[str]]:
        async with RegistryClient(server.address) as client:
            rev = await client.upload_model_revision("models/tail", tiny_model_dir)
            out = tmp_path / "out"
            await client.download_model_revision(rev.name, out)  # verifies every sha256
            await client.create_model("second")
            names = [m.name for m in await client.list_resources("models", page_size=1)]
            return {f.path: f.sha256 for f in rev.manifest.files}, names

    try:
        stored, names = asyncio.run(scenario())
    finally:
        server.stop()
    files = [p for p in tiny_model_dir.rglob("*") if p.is_file()]
    assert stored == {p.relative_to(tiny_model_dir).as_posix(): sha256_file(p) for p in files}
    for p in files:
        rel = p.relative_to(tiny_model_dir)
        assert (tmp_path / "out" / rel).read_bytes() == p.read_bytes()
    assert sorted(names) == ["models/second", "models/tail"]


def test_chunk_buffers_reuse_their_pages() -> None:
    """After keep_transfer_buffers, the buffers a 4 MiB chunk goes through (read, message,
    serialisation) come back from the allocator warm: 50 chunks fault in well under the 200 MB
    they would on fresh pages (without it, about that much here)."""
    if not keep_transfer_buffers():
        pytest.skip("not glibc: nothing to tune")
    block = os.urandom(CHUNK)

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

    def chunks(n: int) -> None:
        for i in range(n):
            request = registry_pb2.UploadModelRevisionRequest()
            request.chunk.path, request.chunk.offset = "w.bin", i * CHUNK
            request.chunk.data = bytes(bytearray(block))  # a fresh buffer, as a read makes
            request.SerializeToString()

    chunks(2)  # the heap grows once to hold a chunk's buffers
    before = faults()
    chunks(50)
    assert (faults() - before) * PAGE < 10 * CHUNK
