"""ModelCache on a scripted registry client: folders are keyed by content, not by name (a name
can come back with other weights), and a team is checked before it becomes a folder."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import Aborted, InvalidArgument
from services.registry.client import ModelCache, manifest_digest
from tlm.registry.v1 import registry_pb2

NAME = "models/m/revisions/r1"


def _manifest(content: bytes) -> registry_pb2.Manifest:
    entry = registry_pb2.ArtifactFile(
        path="model.bin", size_bytes=len(content), sha256=hashlib.sha256(content).hexdigest()
    )
    return registry_pb2.Manifest(files=[entry], total_bytes=len(content))


class ScriptedRegistry:
    """Serves NAME with `content`; `downloads` counts downloads. `swap` changes what a
    download delivers, as a delete and re-upload between the two calls would."""

    def __init__(self, content: bytes) -> None:
        self.content = self.delivered = content
        self.downloads = 0

    async def get_model_revision(self, name: str, team: str | None = None) -> Any:
        return registry_pb2.ModelRevision(name=NAME, manifest=_manifest(self.content))

    async def download_model_revision(
        self, name: str, dest: Path, team: str | None = None
    ) -> registry_pb2.Manifest:
        self.downloads += 1
        (dest / "model.bin").write_bytes(self.delivered)
        return _manifest(self.delivered)


def _get(cache: ModelCache, team: str | None = "team-a") -> tuple[Any, Path]:
    return asyncio.run(cache.get(NAME, team))


def test_one_name_with_other_content_gets_its_own_folder(tmp_path: Path) -> None:
    registry = ScriptedRegistry(b"weights A")
    cache = ModelCache(registry, tmp_path)  # type: ignore[arg-type]
    _rev, first = _get(cache)
    assert _get(cache)[1] == first and registry.downloads == 1  # downloaded once
    registry.content = registry.delivered = b"weights B"  # deleted, uploaded again as r1
    _rev, second = _get(cache)
    assert second != first and registry.downloads == 2
    assert (second / "model.bin").read_bytes() == b"weights B"
    assert (first / "model.bin").read_bytes() == b"weights A"
    assert second == tmp_path / "team-a" / manifest_digest(_manifest(b"weights B"))


def test_content_that_changes_during_the_download_is_not_kept(tmp_path: Path) -> None:
    registry = ScriptedRegistry(b"weights A")
    registry.delivered = b"weights B"
    cache = ModelCache(registry, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(Aborted, match="changed while it was downloaded"):
        _get(cache)
    assert [p.name for p in tmp_path.iterdir()] == []  # no folder, no partial download


@pytest.mark.parametrize("team", ["../escape", "{tmp}/escape", "a/b", ".."])
def test_a_team_that_is_no_folder_name_is_refused(tmp_path: Path, team: str) -> None:
    team = team.format(tmp=tmp_path)  # an absolute path, kept inside the test's folder
    registry = ScriptedRegistry(b"weights A")
    root = tmp_path / "cache"
    with pytest.raises(InvalidArgument, match="not a valid team name"):
        _get(ModelCache(registry, root), team)  # type: ignore[arg-type]
    assert registry.downloads == 0
    assert [p.name for p in tmp_path.iterdir()] == []


def test_the_digest_is_of_paths_and_hashes_in_any_order() -> None:
    files = [registry_pb2.ArtifactFile(path=p, sha256=p * 2) for p in ("a", "b")]
    forward = registry_pb2.Manifest(files=files)
    backward = registry_pb2.Manifest(files=files[::-1])
    assert manifest_digest(forward) == manifest_digest(backward)
    renamed = registry_pb2.Manifest(
        files=[files[0], registry_pb2.ArtifactFile(path="c", sha256="bb")]
    )
    assert manifest_digest(renamed) != manifest_digest(forward)
