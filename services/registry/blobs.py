"""Content-addressed blob storage: a local folder (atomic renames) or any S3-compatible store.

Keys are sha256 hex digests, so identical files are stored once and a key names its bytes.
Uploads are staged in a local file, verified, then `put`; nothing is visible before that.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import structlog

from services.common.errors import NotFound, Unavailable

log = structlog.get_logger("tlm.registry.blobs")
READ_CHUNK = 1024 * 1024
CACHE = "cache"  # S3 blobs downloaded for seeking, under the staging folder


class BlobStore(Protocol):
    # True when `put` makes the staged file itself the blob (fsync, then rename): its bytes are
    # then worth sending to disk while the upload goes on (`start_writeback`).
    adopts_staged: bool

    def staging_dir(self) -> Path:
        """A local folder for staged uploads, on the same filesystem when possible."""
        ...

    def put(self, staged: Path, key: str) -> None:
        """Store the file `staged` under `key` (consuming it); a no-op if `key` exists."""
        ...

    def exists(self, key: str) -> bool: ...

    def read(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]: ...

    def local_copy(self, key: str) -> Path:
        """A local, seekable file holding the blob (the blob itself when stored locally)."""
        ...

    def delete(self, key: str) -> None: ...

    def close(self) -> None:
        """Release the staging folder (the process is stopping)."""
        ...


def _sync_file_range() -> Any:
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing `length` bytes of `fd` from `offset` to disk without waiting for it
    (Linux's sync_file_range), so the fsync before a staged file becomes a blob finds little
    left to write: that fsync was 0.06-0.12 s of a 0.5 s 200 MB upload, after its last byte.
    A no-op where the call does not exist; errors are ignored (the fsync still decides)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class Staging:
    """The local folder uploads stage in. A crash (kill -9) leaves staged bytes behind; they are
    removed when a registry starts while no other process uses the folder, since only then can
    no live upload own them. Each process holds a shared lock on `<folder>.lock` for its life;
    the exclusive lock a start tries for tells the two cases apart (also across processes that
    share the folder on one host)."""

    def __init__(self, path: Path, keep: tuple[str, ...] = ()) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = path.with_name(path.name + ".lock").open("ab")
        self.cleaned = self._clean_if_alone(keep)
        fcntl.flock(self._lock, fcntl.LOCK_SH)

    def _clean_if_alone(self, keep: tuple[str, ...]) -> bool:
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("staging_in_use_elsewhere", path=str(self.path))
            return False
        stale = [p for p in self.path.iterdir() if p.name not in keep]
        for entry in stale:
            if entry.is_dir() and not entry.is_symlink():
                remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)
        if stale:
            log.warning("stale_staging_removed", path=str(self.path), entries=len(stale))
        return True

    def close(self) -> None:
        self._lock.close()


class LocalBlobStore:
    """Blobs under `root/ab/abcdef...`; writes land by atomic rename."""

    adopts_staged = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = Staging(root / ".staging")

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def staging_dir(self) -> Path:
        return self._staging.path

    def put(self, staged: Path, key: str) -> None:
        target = self._path(key)
        if target.exists():
            staged.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged.open("rb") as f:
            os.fsync(f.fileno())  # a crash must not leave a truncated file under its key
        os.replace(staged, target)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def read(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        with self._path(key).open("rb") as f:
            while block := f.read(chunk_size):
                yield block

    def local_copy(self, key: str) -> Path:
        return self._path(key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def close(self) -> None:
        self._staging.close()


class S3BlobStore:
    """Blobs in an S3-compatible bucket under `prefix/`; uploads stage on local disk."""

    adopts_staged = False  # staged files are copied to the bucket, then deleted

    def __init__(self, bucket: str, prefix: str, staging: Path, endpoint_url: str | None) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._staging = Staging(staging, keep=(CACHE,))
        if self._staging.cleaned:  # cached blobs stay valid; half-downloaded ones do not
            for partial in (staging / CACHE).glob("*.partial"):
                partial.unlink(missing_ok=True)
        self.client: Any = boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def staging_dir(self) -> Path:
        return self._staging.path

    def put(self, staged: Path, key: str) -> None:
        try:
            if not self.exists(key):
                with _s3_errors(key):
                    self.client.upload_file(str(staged), self.bucket, self._key(key))
        finally:
            staged.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            with _s3_errors(key):
                raise
        return True

    def read(self, key: str, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        with _s3_errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

    def local_copy(self, key: str) -> Path:
        """Downloaded once into a local cache (blobs are immutable, so the copy never staled)."""
        cached = self._staging.path / CACHE / key
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".partial")
            with _s3_errors(key):
                self.client.download_file(self.bucket, self._key(key), str(tmp))
            os.replace(tmp, cached)
        return cached

    def delete(self, key: str) -> None:
        with _s3_errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def close(self) -> None:
        self._staging.close()


@contextlib.contextmanager
def _s3_errors(key: str) -> Iterator[None]:
    """S3 outages are retryable (UNAVAILABLE); a missing object is a NotFound, logged."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            log.error("blob_missing", key=key)
            raise NotFound(f"blob {key} is missing from the store") from exc
        raise Unavailable(f"blob store error {code}; retry") from exc
    except BotoCoreError as exc:
        raise Unavailable(f"blob store unreachable: {type(exc).__name__}; retry") from exc


def open_blob_store(url: str, staging: Path, endpoint_url: str | None = None) -> BlobStore:
    """`file:///path` or a bare path -> LocalBlobStore; `s3://bucket/prefix` -> S3BlobStore."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3BlobStore(parsed.netloc, parsed.path, staging, endpoint_url)
    if parsed.scheme in ("", "file"):
        return LocalBlobStore(Path(parsed.path if parsed.scheme else url))
    raise ValueError(f"unsupported blob store URL {url!r}: use file:///path or s3://bucket/prefix")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
