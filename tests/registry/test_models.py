"""Model revisions through the real API: push a tiny model, download it byte-identical, load it
with transformers; adapters, lineage, aliases, idempotency, tenancy and refused uploads."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.registry.client import folder_manifest
from tests.registry.conftest import A, B, Registry, details, unique
from tlm.registry.v1 import registry_pb2 as pb


def upload_requests(
    parent: str,
    folder: Path,
    *,
    fmt: int = pb.MODEL_FORMAT_FULL_WEIGHTS,
    request_id: str = "",
    base: str = "",
    manifest: pb.Manifest | None = None,
    stop_after: int | None = None,
) -> Iterator[pb.UploadModelRevisionRequest]:
    manifest = manifest or folder_manifest(folder)
    header = pb.ModelRevisionHeader(
        parent=parent,
        format=fmt,
        request_id=request_id,
        manifest=manifest,  # type: ignore[arg-type]
        lineage=pb.Lineage(base_model_revision=base, training_job="jobs/j1"),
    )
    yield pb.UploadModelRevisionRequest(header=header)
    sent = 0
    for f in manifest.files:
        data = (folder / f.path).read_bytes()
        for off in range(0, len(data), 64 * 1024):
            if stop_after is not None and sent >= stop_after:
                raise ConnectionError("client went away")  # the stream stops midway
            yield pb.UploadModelRevisionRequest(
                chunk=pb.FileChunk(path=f.path, offset=off, data=data[off : off + 64 * 1024])
            )
            sent += 1


def push(
    registry: Registry, folder: Path, name: str | None = None, **kw: object
) -> pb.ModelRevision:
    parent = f"models/{name or unique('m')}"
    return registry.stub.UploadModelRevision(
        upload_requests(parent, folder, **kw), metadata=A, timeout=60
    )  # type: ignore[arg-type]


def download(registry: Registry, name: str, dest: Path) -> pb.Manifest:
    manifest = None
    for message in registry.stub.DownloadModelRevision(
        pb.DownloadModelRevisionRequest(name=name, chunk_size=10_000), metadata=A
    ):
        if message.HasField("manifest"):
            manifest = message.manifest
        else:
            target = dest / message.chunk.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("ab") as f:
                assert f.tell() == message.chunk.offset
                f.write(message.chunk.data)
    assert manifest is not None
    return manifest


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_push_download_byte_identical_and_load(
    registry: Registry, tiny_model_dir: Path, tmp_path: Path
) -> None:
    rev = push(registry, tiny_model_dir)
    assert rev.revision_id == "r1" and rev.format == pb.MODEL_FORMAT_FULL_WEIGHTS
    meta = rev.metadata
    assert (meta.architecture, meta.model_type, meta.dtype) == (
        "Qwen2ForCausalLM",
        "qwen2",
        "float32",
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert meta.parameter_count == sum(p.numel() for p in model.parameters())
    assert meta.tokenizer_present and meta.chat_template_present
    assert rev.lineage.training_job == "jobs/j1"
    manifest = download(registry, rev.name.replace("/r1", "/latest"), tmp_path)
    for f in manifest.files:
        assert _sha(tmp_path / f.path) == _sha(tiny_model_dir / f.path) == f.sha256
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("2+2=", return_tensors="pt").input_ids
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_adapter_revisions_need_a_full_weights_base(
    registry: Registry, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    base = push(registry, tiny_model_dir)
    adapter_dir = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ).save_pretrained(adapter_dir)
    base_alias = base.name.replace("/r1", "/latest")
    adapter = push(registry, adapter_dir, fmt=pb.MODEL_FORMAT_LORA_ADAPTER, base=base_alias)
    assert adapter.lineage.base_model_revision == base.name  # the alias resolved for good
    assert (adapter.metadata.adapter_rank, adapter.metadata.adapter_alpha) == (4, 8)
    assert list(adapter.metadata.adapter_target_modules) == ["q_proj", "v_proj"]
    assert adapter.metadata.parameter_count > 0
    for kw, code in [
        ({}, grpc.StatusCode.INVALID_ARGUMENT),  # no base
        ({"base": adapter.name}, grpc.StatusCode.FAILED_PRECONDITION),  # adapter on an adapter
        ({"base": "models/nope/revisions/r1"}, grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            push(registry, adapter_dir, fmt=pb.MODEL_FORMAT_LORA_ADAPTER, **kw)
        assert err.value.code() == code, err.value.details()
    # A base with dependents cannot be deleted from under them.
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.DeleteModel(
            pb.DeleteModelRequest(name=base.name.split("/revisions")[0]), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_full_weights_need_config_and_weights(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("just text")
    with pytest.raises(grpc.RpcError) as err:
        push(registry, tmp_path)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "config.json" in err.value.details()
    )


def test_idempotent_upload_and_aliases_with_etag(registry: Registry, tiny_model_dir: Path) -> None:
    name = unique("alias")
    r1 = push(registry, tiny_model_dir, name=name, request_id="a")
    assert push(registry, tiny_model_dir, name=name, request_id="a").name == r1.name
    r2 = push(registry, tiny_model_dir, name=name, request_id="b")
    assert r2.revision_id == "r2"
    model = registry.stub.GetModel(pb.GetModelRequest(name=f"models/{name}"), metadata=A)
    assert model.latest_revision_id == "r2"
    moved = registry.stub.SetModelAlias(
        pb.SetModelAliasRequest(name=model.name, alias="prod", revision_id="r1", etag=model.etag),
        metadata=A,
    )
    assert dict(moved.aliases) == {"prod": "r1"}
    prod = registry.stub.GetModelRevision(
        pb.GetModelRevisionRequest(name=f"{model.name}/revisions/prod"), metadata=A
    )
    assert prod.revision_id == "r1" and list(prod.aliases) == ["prod"]
    with pytest.raises(grpc.RpcError) as err:  # a stale etag loses
        registry.stub.SetModelAlias(
            pb.SetModelAliasRequest(
                name=model.name, alias="prod", revision_id="r2", etag=model.etag
            ),
            metadata=A,
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
    for alias, rev, code in [
        ("latest", "r1", grpc.StatusCode.INVALID_ARGUMENT),
        ("prod", "r9", grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.SetModelAlias(
                pb.SetModelAliasRequest(name=model.name, alias=alias, revision_id=rev), metadata=A
            )
        assert err.value.code() == code
    removed = registry.stub.SetModelAlias(
        pb.SetModelAliasRequest(name=model.name, alias="prod"), metadata=A
    )
    assert dict(removed.aliases) == {}
    revisions = registry.stub.ListModelRevisions(
        pb.ListModelRevisionsRequest(parent=model.name, page_size=1), metadata=A
    )
    assert [r.revision_id for r in revisions.revisions] == ["r2"] and revisions.next_page_token
    rest = registry.stub.ListModelRevisions(
        pb.ListModelRevisionsRequest(
            parent=model.name, page_size=1, page_token=revisions.next_page_token
        ),
        metadata=A,
    )
    assert [r.revision_id for r in rest.revisions] == ["r1"] and not rest.next_page_token


def _staging_files(registry: Registry) -> list[Path]:
    return [p for p in (registry.data_dir / "blobs" / ".staging").rglob("*") if p.is_file()]


def test_checksum_mismatch_and_interrupted_stream_store_nothing(
    registry: Registry, tiny_model_dir: Path
) -> None:
    name = unique("bad")
    manifest = folder_manifest(tiny_model_dir)
    manifest.files[0].sha256 = "0" * 64
    with pytest.raises(grpc.RpcError) as err:
        push(registry, tiny_model_dir, name=name, manifest=manifest)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)[0] == "CHECKSUM_MISMATCH"
    with pytest.raises(grpc.RpcError) as err:
        push(registry, tiny_model_dir, name=name, stop_after=2)
    assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    manifest = folder_manifest(tiny_model_dir)
    manifest.files[0].size_bytes += 10  # declared more than will arrive: the stream ends early
    with pytest.raises(grpc.RpcError) as err:
        push(registry, tiny_model_dir, name=name, manifest=manifest)
    assert details(err.value)[0] == "UPLOAD_INCOMPLETE"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.GetModel(pb.GetModelRequest(name=f"models/{name}"), metadata=A)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    deadline = time.monotonic() + 5
    while _staging_files(registry) and time.monotonic() < deadline:
        time.sleep(0.05)  # the cancelled handler cleans up asynchronously
    assert _staging_files(registry) == []


@pytest.mark.parametrize("path", ["../escape", "/abs", "a/../../b", "a\\b"])
def test_manifest_paths_cannot_escape(registry: Registry, tiny_model_dir: Path, path: str) -> None:
    manifest = folder_manifest(tiny_model_dir)
    manifest.files[0].path = path
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadModelRevision(
            iter(
                [
                    pb.UploadModelRevisionRequest(
                        header=pb.ModelRevisionHeader(
                            parent=f"models/{unique('p')}",
                            format=pb.MODEL_FORMAT_FULL_WEIGHTS,
                            manifest=manifest,
                        )
                    )
                ]
            ),
            metadata=A,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)[1][0][0] == "header.manifest.files[0].path"


def test_tenancy_and_names(registry: Registry, tiny_model_dir: Path) -> None:
    rev = push(registry, tiny_model_dir)
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.GetModelRevision(pb.GetModelRevisionRequest(name=rev.name), metadata=B)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(
            registry.stub.DownloadModelRevision(
                pb.DownloadModelRevisionRequest(name=rev.name), metadata=B
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in ["models/a/b", "models/..", "datasets/x", "models/x/revisions/../r1"]:
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.GetModel(pb.GetModelRequest(name=bad), metadata=A)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    created = registry.stub.CreateModel(
        pb.CreateModelRequest(model_id=unique("c"), labels={"f": "q"}), metadata=A
    )
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.CreateModel(
            pb.CreateModelRequest(model_id=created.name.split("/")[1]), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    registry.stub.DeleteModel(pb.DeleteModelRequest(name=created.name), metadata=A)
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.GetModel(pb.GetModelRequest(name=created.name), metadata=A)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_two_caches_fetching_one_revision_share_the_folder(
    registry: Registry, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two workers (separate caches, as separate processes have) download the same revision at
    once: both get the complete folder, and neither removes it from under the other."""
    import asyncio

    from services.registry.client import ModelCache, RegistryClient

    rev = push(registry, tiny_model_dir)

    async def fetch_twice() -> list[Path]:
        clients = [RegistryClient(registry.server.address, api_key="key-a") for _ in range(2)]
        caches = [ModelCache(c, tmp_path / "cache") for c in clients]
        results = await asyncio.gather(*(c.get(rev.name) for c in caches))
        for c in clients:
            await c.close()
        return [folder for _rev, folder in results]

    first, second = asyncio.run(fetch_twice())
    assert first == second and (first / ".complete").exists()
    assert _sha(first / "model.safetensors") == _sha(tiny_model_dir / "model.safetensors")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".partial-")]
