"""Chunked uploads: bytes land in a private temporary folder, are hashed as they arrive, and are
checked against the declared sizes and sha256 before anything is stored (`StagedFiles`); one
upload session per stream checks its header first and stores the revision at the end
(`ModelUpload`, `DatasetUpload`). A model file's sha256 may come in the manifest or, so that a
client hashes while it sends instead of reading every file twice, on the file's last chunk."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from services.common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    field_error,
)
from services.registry import models
from services.registry.blobs import remove_tree, start_writeback
from services.registry.domain import BaseRevisionGone, DatasetHeader, ModelHeader, Revision
from services.specs.names import Collection, parse_resource
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2

if TYPE_CHECKING:
    from services.registry.core import Registry

SHA256 = re.compile(r"[0-9a-f]{64}")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DATA_FILE = "data.jsonl"  # a dataset revision's one file, as downloads name it
BASE_FIELD = "header.lineage.base_model_revision"
UPLOAD_FORMATS = (registry_pb2.MODEL_FORMAT_FULL_WEIGHTS, registry_pb2.MODEL_FORMAT_LORA_ADAPTER)
MAX_CHUNK = 4 * 1024 * 1024
# Staged files keep their manifest paths, so a path must fit the filesystem: 255 bytes a name
# (ext4, xfs), and a total well under PATH_MAX once under the staging folder.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024


class ChecksumMismatch(InvalidArgument):
    reason = common_pb2.CHECKSUM_MISMATCH


class UploadIncomplete(InvalidArgument):
    reason = common_pb2.UPLOAD_INCOMPLETE


def _path_problem(path: str) -> str | None:
    """Why `path` cannot name a staged file, or None."""
    parts = path.split("/")
    # Only canonical paths: "a/./b", "a/" or "./a" would alias another entry's file.
    if (
        not path
        or PurePosixPath(path).is_absolute()
        or "\\" in path
        or "\0" in path
        or any(part in ("", ".", "..") for part in parts)
    ):
        return f"{path[:80]!r} must be a relative a/b path without '.', '..'"
    if len(path.encode()) > MAX_PATH_BYTES or any(
        len(part.encode()) > MAX_NAME_BYTES for part in parts
    ):
        return (
            f"{path[:80]!r} is too long: at most {MAX_NAME_BYTES} bytes a name "
            f"and {MAX_PATH_BYTES} in all"
        )
    return None


def check_manifest(manifest: registry_pb2.Manifest, field: str) -> None:
    """Every path relative, '/'-separated, without '..', short enough for the filesystem;
    sizes >= 0; sha256 hex or empty (then the file's last chunk carries it); no repeats."""
    violations: list[FieldViolation] = []
    seen: set[str] = set()
    paths = {f.path for f in manifest.files}
    if not manifest.files:
        violations.append(FieldViolation(f"{field}.files", "must list at least one file"))
    for i, f in enumerate(manifest.files):
        at = f"{field}.files[{i}].path"
        problem = _path_problem(f.path)
        if problem:
            violations.append(FieldViolation(at, problem))
        if f.path.casefold() in seen:
            violations.append(FieldViolation(at, "listed twice"))
        seen.add(f.path.casefold())
        parts = f.path.split("/")
        if any("/".join(parts[:k]) in paths for k in range(1, len(parts))):
            violations.append(FieldViolation(at, "a folder of this path is also listed as a file"))
        if f.size_bytes < 0:
            violations.append(FieldViolation(f"{field}.files[{i}].size_bytes", "must be >= 0"))
        if f.sha256 and not SHA256.fullmatch(f.sha256):
            violations.append(
                FieldViolation(
                    f"{field}.files[{i}].sha256", "must be 64 lowercase hex digits, or empty"
                )
            )
    if violations:
        raise InvalidArgument(
            f"{violations[0].field}: {violations[0].description}", violations=violations
        )


class _File:
    def __init__(self, entry: registry_pb2.ArtifactFile, path: Path) -> None:
        self.entry = entry
        self.path = path
        self.written = 0
        # What the client says the bytes hash to: from the manifest, or from the last chunk.
        self.declared = entry.sha256 or (EMPTY_SHA256 if entry.size_bytes == 0 else "")
        self.digest = hashlib.sha256()
        self.hashing: Future[None] | None = None  # the last chunk handed to the hash thread
        self.handle: Any = None


class StagedFiles:
    """Receives the chunks of the files a manifest declares into a temporary folder. A chunk is
    hashed in a thread of its own while it is written (both release the GIL): sha256 costs as
    much as the write, so doing them one after the other halves the upload rate."""

    def __init__(
        self, staging_root: Path, manifest: registry_pb2.Manifest, *, write_back: bool = False
    ) -> None:
        """`write_back`: send each chunk on to disk as it is written (`start_writeback`)."""
        self.write_back = write_back
        self.root = Path(tempfile.mkdtemp(dir=staging_root, prefix="upload-"))
        self.files = {e.path: _File(e, self.root / "files" / e.path) for e in manifest.files}
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="tlm-upload-hash")

    def write(self, path: str, offset: int, data: bytes, sha256: str = "") -> None:
        """Stage the chunk at `offset`; `sha256`, only on a file's last chunk, is the whole
        file's digest (required there when the manifest left it empty)."""
        f = self.files.get(path)
        if f is None:
            raise field_error("chunk.path", f"{path!r} is not in the manifest")
        if len(data) > MAX_CHUNK:
            raise field_error("chunk.data", f"chunks are at most {MAX_CHUNK} bytes")
        if offset != f.written:
            raise field_error("chunk.offset", f"{path}: expected offset {f.written}, got {offset}")
        if f.written + len(data) > f.entry.size_bytes:
            raise ChecksumMismatch(
                f"{path}: more bytes than the declared {f.entry.size_bytes}",
                violations=[FieldViolation("chunk.data", "beyond the declared size")],
            )
        self._take_digest(f, len(data), sha256)
        if f.handle is None:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            f.handle = f.path.open("xb")  # never overwrite another entry's bytes
        if f.hashing is not None:
            f.hashing.result()  # at most one chunk is hashed behind the writes
        f.hashing = self._hasher.submit(f.digest.update, data)
        f.handle.write(data)
        if self.write_back:
            f.handle.flush()
            start_writeback(f.handle.fileno(), f.written, len(data))
        f.written += len(data)

    def _take_digest(self, f: _File, size: int, sha256: str) -> None:
        """Check a chunk's `sha256` (before its bytes are written): on the last chunk only, well
        formed, and present there when the manifest did not declare one."""
        last = f.written + size == f.entry.size_bytes
        if sha256 and not last:
            raise field_error("chunk.sha256", f"{f.entry.path}: only on the file's last chunk")
        if sha256 and not SHA256.fullmatch(sha256):
            raise field_error("chunk.sha256", "must be 64 lowercase hex digits")
        if sha256 and f.declared and sha256 != f.declared:
            raise ChecksumMismatch(
                f"{f.entry.path}: the last chunk's sha256 {sha256} differs from the manifest's "
                f"{f.declared}; nothing was stored",
                violations=[FieldViolation("chunk.sha256", "differs from the manifest")],
            )
        if last and not (sha256 or f.declared):
            raise field_error(
                "chunk.sha256",
                f"{f.entry.path}: the manifest left its sha256 empty, so its last chunk must "
                "carry it",
            )
        f.declared = f.declared or sha256

    def manifest(self) -> registry_pb2.Manifest:
        """The files with their verified sha256 (after `finish`)."""
        files = [
            registry_pb2.ArtifactFile(
                path=f.entry.path, size_bytes=f.entry.size_bytes, sha256=f.declared
            )
            for f in self.files.values()
        ]
        return registry_pb2.Manifest(files=files, total_bytes=sum(f.size_bytes for f in files))

    def finish(self) -> Path:
        """Check every file is complete and matches its sha256; returns the staged folder."""
        self._hasher.shutdown(wait=True)  # every chunk hashed
        for f in self.files.values():
            if f.handle is not None:
                f.handle.close()
                f.handle = None
            elif f.entry.size_bytes == 0:
                f.path.parent.mkdir(parents=True, exist_ok=True)
                f.path.touch()
        incomplete = [f for f in self.files.values() if f.written != f.entry.size_bytes]
        if incomplete:
            f = incomplete[0]
            raise UploadIncomplete(
                f"the stream ended early: {f.entry.path} has {f.written} of "
                f"{f.entry.size_bytes} bytes; nothing was stored",
                violations=[FieldViolation("chunk", f"{len(incomplete)} file(s) incomplete")],
            )
        for f in self.files.values():
            if f.digest.hexdigest() != f.declared:
                where = (
                    f"manifest.files[{f.entry.path}].sha256" if f.entry.sha256 else "chunk.sha256"
                )
                raise ChecksumMismatch(
                    f"{f.entry.path}: sha256 of the bytes received is {f.digest.hexdigest()}, "
                    f"not the declared {f.declared}; nothing was stored",
                    violations=[FieldViolation(where, "mismatch")],
                )
        return self.root / "files"

    def cleanup(self) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        for f in self.files.values():
            if f.handle is not None:
                f.handle.close()
        shutil.rmtree(self.root, ignore_errors=True)


class ModelUpload:
    """One UploadModelRevision stream: chunks staged and verified, then stored atomically."""

    def __init__(
        self,
        registry: Registry,
        team: str,
        model_id: str,
        header: ModelHeader,
        lineage: registry_pb2.Lineage,
        base: Revision | None,
    ) -> None:
        self.registry = registry
        self.team = team
        self.model_id = model_id
        self.header = header
        self.lineage = lineage
        self.base = base  # checked again when the revision is stored: it may be deleted meanwhile
        self.done = registry.store.find_request(
            team, Collection.MODELS, model_id, header.request_id
        )
        self.staged = StagedFiles(
            registry.blobs.staging_dir(), header.manifest, write_back=registry.blobs.adopts_staged
        )

    @classmethod
    def begin(cls, registry: Registry, team: str, header: ModelHeader) -> ModelUpload:
        """Check the header (resolving the lineage's aliases) before any bytes arrive."""
        parent = parse_resource(header.parent, Collection.MODELS, "header.parent")
        if header.format not in UPLOAD_FORMATS:
            raise InvalidArgument(
                "header.format must be FULL_WEIGHTS or LORA_ADAPTER",
                violations=[FieldViolation("header.format", "must be set")],
            )
        check_manifest(header.manifest, "header.manifest")
        lineage = registry_pb2.Lineage()
        lineage.CopyFrom(header.lineage)
        base = None
        if header.lineage.base_model_revision:
            base = registry.get_revision(
                team, header.lineage.base_model_revision, Collection.MODELS, BASE_FIELD
            )
            lineage.base_model_revision = base.name  # aliases resolved: lineage is immutable
            assert isinstance(base.body, registry_pb2.ModelRevision)
            full = base.body.format == registry_pb2.MODEL_FORMAT_FULL_WEIGHTS
            if header.format == registry_pb2.MODEL_FORMAT_LORA_ADAPTER and not full:
                raise FailedPrecondition(
                    f"{base.name} is not a full-weights revision; adapters apply to full weights",
                    violations=[FieldViolation(BASE_FIELD, "not full weights")],
                )
        elif header.format == registry_pb2.MODEL_FORMAT_LORA_ADAPTER:
            raise InvalidArgument(
                f"a LORA_ADAPTER revision needs {BASE_FIELD}",
                violations=[FieldViolation(BASE_FIELD, "required")],
            )
        for i, ds in enumerate(header.lineage.dataset_revisions):
            field = f"header.lineage.dataset_revisions[{i}]"
            lineage.dataset_revisions[i] = registry.get_revision(
                team, ds, Collection.DATASETS, field
            ).name
        return cls(registry, team, parent.resource_id, header, lineage, base)

    def write(self, chunk: registry_pb2.FileChunk) -> None:
        if self.done is None:  # a retried upload's bytes are not needed again
            self.staged.write(chunk.path, chunk.offset, chunk.data, chunk.sha256)

    def finish(self) -> Revision:
        if self.done is not None:
            return self.done
        folder = self.staged.finish()
        manifest = self.staged.manifest()  # every sha256 verified, wherever it was declared
        fmt = self.header.format
        metadata = (
            models.adapter_metadata(folder)
            if fmt == registry_pb2.MODEL_FORMAT_LORA_ADAPTER
            else models.full_weights_metadata(folder)
        )
        for entry in manifest.files:
            self.registry.blobs.put(folder / entry.path, entry.sha256)
        body = registry_pb2.ModelRevision(
            format=fmt,  # type: ignore[arg-type]
            lineage=self.lineage,
            metadata=metadata,
            manifest=manifest,
            description=self.header.description,
            labels=dict(self.header.labels),
        )
        store = self.registry.store
        try:
            revision, _ = store.add_revision(
                self.team,
                Collection.MODELS,
                self.model_id,
                request_id=self.header.request_id,
                body=lambda _rid: body,
                blobs=[f.sha256 for f in manifest.files],
                create_parent=lambda: store.create_resource(
                    self.team, Collection.MODELS, self.model_id, exist_ok=True
                ),
                base=self.base,
            )
        except BaseRevisionGone as exc:
            raise NotFound(
                exc.message,
                violations=[FieldViolation(BASE_FIELD, "deleted during the upload")],
                metadata=exc.metadata,
            ) from None
        return revision

    def cleanup(self) -> None:
        self.staged.cleanup()
        remove_tree(self.staged.root)


class DatasetUpload:
    """One UploadDatasetRevision stream: the file staged and verified against the header's size
    and sha256, then validated row by row and stored."""

    def __init__(self, registry: Registry, team: str, header: DatasetHeader) -> None:
        self.registry = registry
        self.team = team
        self.header = header
        entry = registry_pb2.ArtifactFile(
            path=DATA_FILE, size_bytes=header.size_bytes, sha256=header.sha256
        )
        # Not written back: the blob is the validated copy of these bytes, not the file itself.
        self.staged = StagedFiles(
            registry.blobs.staging_dir(), registry_pb2.Manifest(files=[entry])
        )
        self.received = 0

    @classmethod
    def begin(cls, registry: Registry, team: str, header: DatasetHeader) -> DatasetUpload:
        """Check the header before any bytes arrive: the dataset, its kind, size and sha256."""
        registry.check_dataset_header(team, header)
        violations = []
        if header.size_bytes < 0:
            violations.append(FieldViolation("header.size_bytes", "must be >= 0"))
        if not SHA256.fullmatch(header.sha256):
            violations.append(FieldViolation("header.sha256", "must be 64 lowercase hex digits"))
        if violations:
            raise InvalidArgument(
                f"{violations[0].field}: {violations[0].description}", violations=violations
            )
        return cls(registry, team, header)

    def write(self, data: bytes) -> None:
        self.staged.write(DATA_FILE, self.received, data)
        self.received += len(data)

    def finish(self) -> Revision:
        if self.received == 0 and self.header.size_bytes == 0:
            raise InvalidArgument(
                "the file is empty", violations=[FieldViolation("data", "empty file")]
            )
        folder = self.staged.finish()
        return self.registry.upload_dataset(self.team, self.header, folder / DATA_FILE)

    def cleanup(self) -> None:
        self.staged.cleanup()
