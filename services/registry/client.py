"""Moved to services/clients/ (one client per service); these names stay importable here."""

from services.clients.artifacts import (
    CHUNK,
    ModelCache,
    folder_manifest,
    from_struct,
    manifest_digest,
    sha256_file,
    to_struct,
    write_download,
)
from services.clients.registry import RegistryClient

__all__ = [
    "CHUNK",
    "ModelCache",
    "RegistryClient",
    "folder_manifest",
    "from_struct",
    "manifest_digest",
    "sha256_file",
    "to_struct",
    "write_download",
]
