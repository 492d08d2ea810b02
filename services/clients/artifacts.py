"""Files in and out of the registry: manifests with sha256, verified downloads, and the model
cache that keeps one local copy per revision content."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format, struct_pb2

from services.common.errors import Aborted, InvalidArgument
from services.common.ids import team_dir
from services.common.streams import consume_pipelined
from tlm.registry.v1 import registry_pb2

if TYPE_CHECKING:
    from services.clients.registry import RegistryClient

CHUNK = 4 * 1024 * 1024 - 64 * 1024  # under the 4 MiB per-message cap with room for framing
# glibc's mallopt parameters (malloc.h) and the values transfers need.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 64 << 20  # the most glibc's own adjustment reaches


@functools.cache
def keep_transfer_buffers() -> bool:
    """Let the C allocator reuse freed chunk-sized buffers instead of handing them back to the
    kernel; once per process, called by both ends of a registry transfer. Every chunk passes
    through several 4 MiB buffers (the read, the message, its serialisation, gRPC's copy); by
    default glibc trims its heap whenever 8 MiB lie free at the top, so each buffer lands on
    fresh pages that the kernel faults in and zeroes again: about 0.2 CPU-s per 200 MB and
    buffer on our 2-core VM, more than sha256, and half the transfer rate measured
    (bench/registry_upload.py). The thresholds set here, 32 MiB for mmap and 64 MiB for trimming,
    are the highest glibc's dynamic adjustment reaches by itself once a process has freed a
    32 MiB buffer (as torch processes do); at most 64 MiB of free heap stays per allocator arena.
    False (nothing changed) without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_blocks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            yield block


def hashed_blocks(path: Path, size: int) -> Iterator[tuple[bytes, str]]:
    """The first `size` bytes of `path` in blocks, each with "" except the last, which comes
    with the sha256 of all of them: a file is read once, hashed as it is sent. A file that
    shrank since `size` was taken ends without a digest (the service then reports it short)."""
    digest = hashlib.sha256()
    left = size
    with path.open("rb") as f:
        while left and (block := f.read(min(CHUNK, left))):
            digest.update(block)  # releases the GIL: the previous block is sent meanwhile
            left -= len(block)
            yield block, "" if left else digest.hexdigest()


def folder_manifest(folder: Path, *, digests: bool = True) -> registry_pb2.Manifest:
    """Path, size and sha256 of every file under `folder`, which must exist (a missing folder
    is the caller's mistake, not an empty model). Without `digests`, sha256 is left empty (an
    upload sends each file's on its last chunk instead)."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    if not folder.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(folder))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = [
        registry_pb2.ArtifactFile(
            path=p.relative_to(folder).as_posix(),
            size_bytes=p.stat().st_size,
            sha256=sha256_file(p) if digests else "",
        )
        for p in files
    ]
    return registry_pb2.Manifest(files=entries, total_bytes=sum(e.size_bytes for e in entries))


def to_struct(row: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(row)
    return s


def from_struct(s: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(s)


async def write_download(
    stream: AsyncIterable[registry_pb2.DownloadChunk], dest: Path
) -> registry_pb2.Manifest:
    """Consume a DownloadChunk stream into `dest`, checking each file's size and sha256. Chunks
    are written in a thread while the next ones arrive (consume_pipelined), and hashed in
    another while they are written (both release the GIL)."""
    keep_transfer_buffers()
    manifests: list[registry_pb2.Manifest] = []
    digests: dict[str, Any] = {}
    handles: dict[str, Any] = {}
    hasher = ThreadPoolExecutor(1, thread_name_prefix="tlm-download-hash")
    hashing: list[Future[None]] = []  # the last chunk handed to the hash thread

    def take(message: registry_pb2.DownloadChunk) -> None:
        if message.HasField("manifest"):
            manifests.append(message.manifest)
            return
        chunk = message.chunk
        if chunk.path not in handles:
            target = dest / chunk.path
            target.parent.mkdir(parents=True, exist_ok=True)
            handles[chunk.path] = target.open("wb")
            digests[chunk.path] = hashlib.sha256()
        data = chunk.data
        if hashing:
            hashing.pop().result()  # at most one chunk is hashed behind the writes
        hashing.append(hasher.submit(digests[chunk.path].update, data))
        handles[chunk.path].write(data)

    try:
        await consume_pipelined(stream, take)
    finally:
        await asyncio.to_thread(hasher.shutdown, wait=True)
        for handle in handles.values():
            handle.close()
    if not manifests:
        raise InvalidArgument("download stream carried no manifest")
    manifest = manifests[-1]
    for entry in manifest.files:
        got = digests.get(entry.path, hashlib.sha256()).hexdigest()
        if got != entry.sha256:
            raise InvalidArgument(f"{entry.path}: sha256 {got} != manifest {entry.sha256}")
        if not (dest / entry.path).exists():
            (dest / entry.path).touch()  # empty files carry no chunk
    return manifest


def manifest_digest(manifest: registry_pb2.Manifest) -> str:
    """sha256 over the sorted (path, sha256) pairs: what a revision holds, not what it is
    called. A model deleted and created again reuses its revision names ("r1")."""
    pairs = sorted((f.path, f.sha256) for f in manifest.files)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


class ModelCache:
    """Local copies of model revisions, one folder per team and content digest (immutable).

    Keyed by content, not name: a name may later mean other weights (delete, then upload
    again), and a name-keyed cache would serve the deleted model's files."""

    def __init__(self, client: RegistryClient, root: Path) -> None:
        self.client = client
        self.root = root
        self._locks: dict[str, asyncio.Lock] = {}

    def folder(self, revision: registry_pb2.ModelRevision, team: str | None) -> Path:
        # No team: the caller's key decides it; "_" is ours, never a team (ids start [a-z0-9]).
        base = team_dir(self.root, team) if team else self.root / "_"
        return base / manifest_digest(revision.manifest)

    async def get(
        self, name: str, team: str | None = None
    ) -> tuple[registry_pb2.ModelRevision, Path]:
        """Resolve aliases, then download once; returns the revision and its local folder."""
        revision = await self.client.get_model_revision(name, team)
        folder = self.folder(revision, team)
        lock = self._locks.setdefault(str(folder), asyncio.Lock())
        async with lock:
            if not (folder / ".complete").exists():
                await self._download(revision, folder, team)
        return revision, folder

    async def _download(
        self, revision: registry_pb2.ModelRevision, folder: Path, team: str | None
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".partial-"))
        try:
            manifest = await self.client.download_model_revision(revision.name, tmp, team)
            if manifest_digest(manifest) != folder.name:
                # The name was deleted and reused between the two calls: never file new
                # content under the old digest.
                raise Aborted(f"{revision.name} changed while it was downloaded; retry")
            marker = {"name": revision.name, "digest": folder.name}
            (tmp / ".complete").write_text(json.dumps(marker))
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(tmp, folder)  # atomic: readers see nothing or everything
            except OSError:
                # Another process (a second worker) placed the same immutable content first;
                # never remove a folder someone may be loading from.
                if not (folder / ".complete").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
