"""Staging of chunked uploads: bytes land in a private temporary folder, are hashed as they
arrive, and are checked against the declared sizes and sha256 before anything is stored."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument, field_error
from tlm.common.v1 import common_pb2
from tlm.registry.v1 import registry_pb2

SHA256 = re.compile(r"[0-9a-f]{64}")
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
    sizes >= 0; sha256 hex; no repeats."""
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
        if not SHA256.fullmatch(f.sha256):
            violations.append(
                FieldViolation(f"{field}.files[{i}].sha256", "must be 64 lowercase hex digits")
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
        self.digest = hashlib.sha256()
        self.handle: Any = None


class StagedFiles:
    """Receives the chunks of the files a manifest declares into a temporary folder."""

    def __init__(self, staging_root: Path, manifest: registry_pb2.Manifest) -> None:
        self.root = Path(tempfile.mkdtemp(dir=staging_root, prefix="upload-"))
        self.files = {e.path: _File(e, self.root / "files" / e.path) for e in manifest.files}

    def write(self, path: str, offset: int, data: bytes) -> None:
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
        if f.handle is None:
            f.path.parent.mkdir(parents=True, exist_ok=True)
            f.handle = f.path.open("xb")  # never overwrite another entry's bytes
        f.handle.write(data)
        f.digest.update(data)
        f.written += len(data)

    def finish(self) -> Path:
        """Check every file is complete and matches its sha256; returns the staged folder."""
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
            if f.digest.hexdigest() != f.entry.sha256:
                raise ChecksumMismatch(
                    f"{f.entry.path}: sha256 of the bytes received is {f.digest.hexdigest()}, "
                    f"not the declared {f.entry.sha256}; nothing was stored",
                    violations=[
                        FieldViolation(f"manifest.files[{f.entry.path}].sha256", "mismatch")
                    ],
                )
        return self.root / "files"

    def cleanup(self) -> None:
        for f in self.files.values():
            if f.handle is not None:
                f.handle.close()
        shutil.rmtree(self.root, ignore_errors=True)
