"""A model file's sha256 sent on its last chunk instead of in the manifest (a client hashes while
it sends): checked against the bytes received before anything is stored, stored in the revision's
manifest, and refused, naming `chunk.sha256`, when missing, misplaced, malformed or wrong."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from services.registry import blobs, uploads
from services.registry.client import folder_manifest
from tests.registry.conftest import A, Registry, dataset_requests, details, unique
from tests.registry.test_models import download
from tlm.registry.v1 import registry_pb2 as pb

CHUNK = 64 * 1024
Digests = Callable[[str, int, int, str], str]  # (path, chunk index, chunk count, sha256) -> sent


def _on_last(path: str, i: int, n: int, sha256: str) -> str:
    return sha256 if i == n - 1 else ""


@pytest.fixture
def model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model plus bytes no other test uploads (so its blobs are new) and an empty file."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "extra.bin").write_bytes(os.urandom(3 * CHUNK + 5))
    (folder / "empty.txt").write_bytes(b"")
    return folder


def requests(
    parent: str, folder: Path, digests: Digests
) -> Iterator[pb.UploadModelRevisionRequest]:
    """A header whose manifest leaves every sha256 empty, then chunks carrying `digests`."""
    manifest = folder_manifest(folder, digests=False)
    assert all(not f.sha256 for f in manifest.files)
    header = pb.ModelRevisionHeader(
        parent=parent, format=pb.MODEL_FORMAT_FULL_WEIGHTS, manifest=manifest
    )
    yield pb.UploadModelRevisionRequest(header=header)
    for f in manifest.files:
        data = (folder / f.path).read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        offsets = range(0, len(data), CHUNK)
        for i, off in enumerate(offsets):
            chunk = pb.FileChunk(
                path=f.path,
                offset=off,
                data=data[off : off + CHUNK],
                sha256=digests(f.path, i, len(offsets), sha256),
            )
            yield pb.UploadModelRevisionRequest(chunk=chunk)


def _blob_exists(registry: Registry, sha256: str) -> bool:
    return (registry.data_dir / "blobs" / sha256[:2] / sha256).exists()


def _staging_files(registry: Registry) -> list[Path]:
    return [p for p in (registry.data_dir / "blobs" / ".staging").rglob("*") if p.is_file()]


def test_digests_on_last_chunks_are_verified_and_stored(
    registry: Registry, model: Path, tmp_path: Path
) -> None:
    rev = registry.stub.UploadModelRevision(
        requests(f"models/{unique('tail')}", model, _on_last), metadata=A, timeout=60
    )
    expected = {f.path: f.sha256 for f in folder_manifest(model).files}
    assert {f.path: f.sha256 for f in rev.manifest.files} == expected
    assert expected["empty.txt"] == hashlib.sha256(b"").hexdigest()
    assert rev.manifest.total_bytes == sum(p.stat().st_size for p in model.iterdir())
    fetched = download(registry, rev.name, tmp_path / "out")
    assert fetched == rev.manifest
    for path, sha256 in expected.items():
        got = tmp_path / "out" / path  # an empty file has no chunk, so this download skips it
        assert (got.read_bytes() if got.exists() else b"") == (model / path).read_bytes()
        assert _blob_exists(registry, sha256)


def _wrong(path: str, i: int, n: int, sha256: str) -> str:
    return ("0" * 64 if path == "extra.bin" else sha256) if i == n - 1 else ""


def _missing(path: str, i: int, n: int, sha256: str) -> str:
    return "" if path == "extra.bin" else _on_last(path, i, n, sha256)


def _early(path: str, i: int, n: int, sha256: str) -> str:
    return sha256 if path == "extra.bin" and i == 0 else _on_last(path, i, n, sha256)


def _malformed(path: str, i: int, n: int, sha256: str) -> str:
    return sha256.upper() if path == "extra.bin" and i == n - 1 else _on_last(path, i, n, sha256)


@pytest.mark.parametrize(
    ("digests", "reason", "says"),
    [
        (_wrong, "CHECKSUM_MISMATCH", "mismatch"),
        (_missing, "", "last chunk must carry it"),
        (_early, "", "only on the file's last chunk"),
        (_malformed, "", "64 lowercase hex"),
    ],
)
def test_a_wrong_missing_or_misplaced_digest_stores_nothing(
    registry: Registry, model: Path, digests: Digests, reason: str, says: str
) -> None:
    name = unique("badtail")
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadModelRevision(
            requests(f"models/{name}", model, digests), metadata=A, timeout=60
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got_reason, violations = details(err.value)
    if reason:
        assert got_reason == reason
    assert violations[0][0] == "chunk.sha256"
    assert says in (err.value.details() or "") + violations[0][1]
    with pytest.raises(grpc.RpcError) as missing:
        registry.stub.GetModel(pb.GetModelRequest(name=f"models/{name}"), metadata=A)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    extra = hashlib.sha256((model / "extra.bin").read_bytes()).hexdigest()
    assert not _blob_exists(registry, extra)
    deadline = time.monotonic() + 5
    while _staging_files(registry) and time.monotonic() < deadline:
        time.sleep(0.05)  # the handler cleans up after the error is sent
    assert _staging_files(registry) == []


def test_a_last_chunk_digest_must_agree_with_the_manifest(registry: Registry, model: Path) -> None:
    """Both given: each is checked, so a digest that contradicts the manifest is refused."""
    manifest = folder_manifest(model)
    header = pb.ModelRevisionHeader(
        parent=f"models/{unique('both')}", format=pb.MODEL_FORMAT_FULL_WEIGHTS, manifest=manifest
    )
    chunks = [
        pb.FileChunk(
            path=f.path,
            data=(model / f.path).read_bytes(),
            sha256="f" * 64 if f.path == "extra.bin" else f.sha256,
        )
        for f in manifest.files
        if f.size_bytes
    ]
    stream = [pb.UploadModelRevisionRequest(header=header)] + [
        pb.UploadModelRevisionRequest(chunk=c) for c in chunks
    ]
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadModelRevision(iter(stream), metadata=A, timeout=60)
    assert details(err.value) == (
        "CHECKSUM_MISMATCH",
        [("chunk.sha256", "differs from the manifest")],
    )


def test_a_malformed_manifest_digest_names_the_field(registry: Registry, model: Path) -> None:
    manifest = folder_manifest(model, digests=False)
    manifest.files[1].sha256 = "xyz"
    header = pb.ModelRevisionHeader(
        parent=f"models/{unique('m')}", format=pb.MODEL_FORMAT_FULL_WEIGHTS, manifest=manifest
    )
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadModelRevision(
            iter([pb.UploadModelRevisionRequest(header=header)]), metadata=A
        )
    assert details(err.value)[1][0][0] == "header.manifest.files[1].sha256"


def test_staged_model_bytes_go_to_disk_while_the_upload_runs(
    registry: Registry, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local blob store adopts a model's staged file (fsync, rename), so each chunk's
    writeback starts as it is written (Linux sync_file_range); a dataset's staged file is not
    the blob (its validated copy is), so it is not written back."""
    assert sys.platform != "linux" or blobs._SYNC_FILE_RANGE is not None  # not a silent no-op
    assert blobs.LocalBlobStore.adopts_staged and not blobs.S3BlobStore.adopts_staged
    started: list[tuple[str, int, int]] = []
    real = uploads.start_writeback

    def recorded(fd: int, offset: int, length: int) -> None:
        started.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(uploads, "start_writeback", recorded)
    parent = f"models/{unique('wb')}"
    registry.stub.UploadModelRevision(requests(parent, model, _on_last), metadata=A, timeout=60)
    assert [(o, n) for name, o, n in started if name == "extra.bin"] == [
        (0, CHUNK),
        (CHUNK, CHUNK),
        (2 * CHUNK, CHUNK),
        (3 * CHUNK, 5),
    ]  # as each of its chunks was written
    started.clear()
    registry.stub.UploadDatasetRevision(
        dataset_requests(f"datasets/{unique('wb')}", b'{"prompt": "p"}\n', pb.DATASET_KIND_PROMPT),
        metadata=A,
        timeout=30,
    )
    assert started == []
