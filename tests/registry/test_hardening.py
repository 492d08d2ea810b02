"""Findings of the security review, each against a real registry: staged bytes a crash left
behind, a base model deleted under an adapter upload, revision ids reused after a delete,
unknown enum numbers, and model files whose facts cannot be read."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from services.common.errors import InvalidArgument
from services.registry import convert
from services.registry.blobs import LocalBlobStore, S3BlobStore
from services.registry.client import folder_manifest
from tests.registry.conftest import A, Registry, dataset_requests, details, start_registry, unique
from tests.registry.test_models import upload_requests
from tlm.registry.v1 import registry_pb2 as pb
from tlm.registry.v1 import registry_pb2_grpc

BASE_FIELD = "header.lineage.base_model_revision"


def safetensors(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


ONE_TENSOR = safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)


def full_model(folder: Path, config: dict[str, object] | None = None) -> Path:
    """A tiny but well-formed full-weights folder (no real model: only the facts matter)."""
    folder.mkdir(parents=True, exist_ok=True)
    values = {"architectures": ["TinyForCausalLM"], "model_type": "tiny"}
    (folder / "config.json").write_text(json.dumps(values | (config or {})))
    (folder / "model.safetensors").write_bytes(ONE_TENSOR)
    return folder


def adapter(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(ONE_TENSOR)
    return folder


def struct_row(row: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(row)
    return s


def code_of(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code().name  # type: ignore[no-any-return]
    return "OK"


# Staged bytes left by a crash -----------------------------------------------------------


def _plant(staging: Path) -> list[Path]:
    left = [staging / "upload-dead" / "files" / "model.safetensors", staging / "ds-dead"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"bytes of an upload killed with -9")
    return left


def test_stale_staging_is_removed_when_the_registry_starts(tmp_path: Path) -> None:
    left = _plant(tmp_path / "blobs" / ".staging")
    server = start_registry(tmp_path, None)
    try:
        assert [p for p in left if p.exists()] == []
        assert list((tmp_path / "blobs" / ".staging").iterdir()) == []
        with grpc.insecure_channel(server.address) as channel:  # and staging still works
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            folder = full_model(tmp_path / "m")
            stub.UploadModelRevision(upload_requests("models/after", folder), metadata=A)
    finally:
        server.stop()


def test_staging_of_a_live_registry_is_kept(tmp_path: Path) -> None:
    """A second process on the same folder must not delete what the first is staging."""
    live = LocalBlobStore(tmp_path)
    left = _plant(tmp_path / ".staging")
    second = LocalBlobStore(tmp_path)
    assert all(p.exists() for p in left)
    live.close()
    second.close()
    LocalBlobStore(tmp_path).close()  # now nobody else holds it: cleaned
    assert not any(p.exists() for p in left)


def test_s3_staging_is_cleaned_but_keeps_downloaded_blobs(tmp_path: Path) -> None:
    left = _plant(tmp_path)
    cached, partial = tmp_path / "cache" / ("a" * 64), tmp_path / "cache" / f"{'b' * 64}.partial"
    cached.parent.mkdir()
    cached.write_bytes(b"a whole blob")
    partial.write_bytes(b"half a bl")
    store = S3BlobStore("bucket", "prefix", tmp_path, "http://127.0.0.1:9")  # never contacted
    store.close()
    assert [p for p in [*left, partial] if p.exists()] == [] and cached.exists()


# A base deleted under an adapter upload ------------------------------------------------


def _paused_upload(
    parent: str, folder: Path, base: str, go: threading.Event
) -> Iterator[pb.UploadModelRevisionRequest]:
    """The header at once, the bytes only once `go` is set."""
    requests = upload_requests(parent, folder, fmt=pb.MODEL_FORMAT_LORA_ADAPTER, base=base)
    yield next(requests)
    go.wait(30)
    yield from requests


def _staged_uploads(registry: Registry) -> list[Path]:
    return list((registry.data_dir / "blobs" / ".staging").glob("upload-*"))


def test_a_base_deleted_during_an_adapter_upload_fails_the_upload(
    registry: Registry, tmp_path: Path
) -> None:
    base = registry.stub.UploadModelRevision(
        upload_requests(f"models/{unique('base')}", full_model(tmp_path / "base")), metadata=A
    )
    go, folder, parent = threading.Event(), adapter(tmp_path / "adapter"), unique("ad")
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(
            registry.stub.UploadModelRevision,
            _paused_upload(f"models/{parent}", folder, base.name, go),
            metadata=A,
            timeout=60,
        )
        deadline = time.monotonic() + 20
        while not _staged_uploads(registry):  # the header, base check included, is accepted
            assert time.monotonic() < deadline and not upload.done(), "upload never started"
            time.sleep(0.01)
        model = base.name.split("/revisions/")[0]
        registry.stub.DeleteModel(pb.DeleteModelRequest(name=model), metadata=A)
        go.set()
        with pytest.raises(grpc.RpcError) as err:
            upload.result()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
    assert [f for f, _ in details(err.value)[1]] == [BASE_FIELD]
    latest = pb.GetModelRevisionRequest(name=f"models/{parent}/revisions/latest")
    assert code_of(lambda: registry.stub.GetModelRevision(latest, metadata=A)) == "NOT_FOUND"


def test_delete_and_adapter_upload_racing_never_both_succeed(
    registry: Registry, tmp_path: Path
) -> None:
    base_folder, folder = full_model(tmp_path / "base"), adapter(tmp_path / "adapter")

    def race(i: int) -> tuple[str, str]:
        model = f"models/{unique(f'race{i}')}"
        base = registry.stub.UploadModelRevision(upload_requests(model, base_folder), metadata=A)
        start = threading.Barrier(2)

        def delete() -> str:
            start.wait()
            return code_of(
                lambda: registry.stub.DeleteModel(pb.DeleteModelRequest(name=model), metadata=A)
            )

        def push() -> str:
            start.wait()
            requests = upload_requests(
                f"models/{unique('ad')}", folder, fmt=pb.MODEL_FORMAT_LORA_ADAPTER, base=base.name
            )
            return code_of(lambda: registry.stub.UploadModelRevision(requests, metadata=A))

        with ThreadPoolExecutor(2) as pool:
            deleted, pushed = pool.submit(delete), pool.submit(push)
            return deleted.result(), pushed.result()

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(race, range(16)))
    for deleted, pushed in outcomes:
        assert (deleted, pushed) in {
            ("OK", "NOT_FOUND"),
            ("FAILED_PRECONDITION", "OK"),
        }, outcomes


# Revision ids after a delete -----------------------------------------------------------


def test_revision_ids_are_never_reused_after_a_delete(registry: Registry, tmp_path: Path) -> None:
    folder, model = full_model(tmp_path / "m"), f"models/{unique('again')}"
    for _ in range(2):
        registry.stub.UploadModelRevision(upload_requests(model, folder), metadata=A)
    registry.stub.DeleteModel(pb.DeleteModelRequest(name=model), metadata=A)
    created = registry.stub.CreateModel(
        pb.CreateModelRequest(model_id=model.split("/")[1]), metadata=A
    )
    assert created.latest_revision_id == ""
    again = registry.stub.UploadModelRevision(upload_requests(model, folder), metadata=A)
    assert again.revision_id == "r3"
    for old in ("r1", "r2"):
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.GetModelRevision(
                pb.GetModelRevisionRequest(name=f"{model}/revisions/{old}"), metadata=A
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:  # no alias to a revision of the deleted model
        registry.stub.SetModelAlias(
            pb.SetModelAliasRequest(name=model, alias="prod", revision_id="r1"), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = registry.stub.ListModelRevisions(
        pb.ListModelRevisionsRequest(parent=model), metadata=A
    )
    assert [r.revision_id for r in listed.revisions] == ["r3"]


def test_dataset_revision_ids_are_never_reused_after_a_delete(registry: Registry) -> None:
    parent = f"datasets/{unique('again')}"
    row = {"prompt": "p"}
    append = pb.AppendDatasetRowsRequest(
        parent=parent, kind=pb.DATASET_KIND_PROMPT, rows=[struct_row(row)]
    )
    registry.stub.AppendDatasetRows(append, metadata=A)
    registry.stub.DeleteDataset(pb.DeleteDatasetRequest(name=parent), metadata=A)
    assert registry.stub.AppendDatasetRows(append, metadata=A).revision_id == "r2"


# Unknown enum numbers ------------------------------------------------------------------


def test_unknown_enum_numbers_are_refused_and_nothing_is_created(registry: Registry) -> None:
    name = unique("kind")
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.CreateDataset(
            pb.CreateDatasetRequest(dataset_id=name, kind=99),  # type: ignore[arg-type]
            metadata=A,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details(err.value)[1]] == ["kind"]
    assert (
        code_of(
            lambda: registry.stub.GetDataset(
                pb.GetDatasetRequest(name=f"datasets/{name}"), metadata=A
            )
        )
        == "NOT_FOUND"
    )
    for kind, fmt, field in [
        (99, pb.DATASET_FORMAT_JSONL, "header.kind"),
        (pb.DATASET_KIND_PROMPT, 7, "header.format"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.UploadDatasetRevision(
                dataset_requests(f"datasets/{name}", b'{"prompt": "p"}\n', kind, fmt=fmt),
                metadata=A,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in details(err.value)[1]] == [field]
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.AppendDatasetRows(
            pb.AppendDatasetRowsRequest(parent=f"datasets/{name}", kind=42, rows=[]),  # type: ignore[arg-type]
            metadata=A,
        )
    assert [f for f, _ in details(err.value)[1]] == ["kind"]


def test_enum_check_walks_nested_repeated_and_map_fields() -> None:
    request = pb.AppendDatasetRowsRequest(
        kind=pb.DATASET_KIND_SFT, rows=[struct_row({"a": [1, None]})]
    )
    request.rows[0].fields["a"].list_value.values[1].null_value = 3  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as err:
        convert.check_enums(request)
    assert [v.field for v in err.value.violations] == [
        "rows[0].fields['a'].list_value.values[1].null_value"
    ]
    convert.check_enums(pb.CreateDatasetRequest(kind=pb.DATASET_KIND_PROMPT))  # known numbers pass


# Model files whose facts cannot be read ------------------------------------------------

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_FILES = {
    "header size beyond the file": ("model.safetensors", struct.pack("<Q", 10**6) + b"{}"),
    "header not an object": ("model.safetensors", safetensors([1, 2])),
    "shape of strings": ("model.safetensors", safetensors({"w": F32 | {"shape": ["a"]}}, b"0" * 8)),
    "shape beyond its bytes": (
        "model.safetensors",
        safetensors({"w": F32 | {"shape": [2**40, 2**40]}}, b"0" * 8),
    ),
    "offsets beyond the file": (
        "model.safetensors",
        safetensors({"w": F32 | {"data_offsets": [0, 800]}}, b"0" * 8),
    ),
    "tensor not an object": ("model.safetensors", safetensors({"w": "F32"})),
}
BAD_CONFIGS = {
    "max_position_embeddings": ("lots", "max_position_embeddings: expected an integer"),
    "architectures": ({"x": 1}, "architectures: expected a list of strings"),
    "model_type": (["qwen2"], "model_type: expected a string"),
}


def _refused_and_stored_nothing(
    registry: Registry,
    folder: Path,
    file: str,
    fmt: int = pb.MODEL_FORMAT_FULL_WEIGHTS,
    base: str = "",
) -> grpc.RpcError:
    parent = f"models/{unique('bad')}"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadModelRevision(
            upload_requests(parent, folder, fmt=fmt, base=base), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert [f for f, _ in details(err.value)[1]] == [f"header.manifest.files[{file}]"]
    assert (
        code_of(lambda: registry.stub.GetModel(pb.GetModelRequest(name=parent), metadata=A))
        == "NOT_FOUND"
    )
    key = next(f.sha256 for f in folder_manifest(folder).files if f.path == file)
    assert not (registry.data_dir / "blobs" / key[:2] / key).exists()
    return err.value


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_safetensors_are_invalid_argument(
    registry: Registry, tmp_path: Path, case: str
) -> None:
    folder = full_model(tmp_path)
    file, data = BAD_FILES[case]
    (folder / file).write_bytes(data)
    _refused_and_stored_nothing(registry, folder, file)


@pytest.mark.parametrize("key", sorted(BAD_CONFIGS))
def test_config_values_of_the_wrong_type_are_invalid_argument(
    registry: Registry, tmp_path: Path, key: str
) -> None:
    value, problem = BAD_CONFIGS[key]
    folder = full_model(tmp_path, {key: value, "salt": unique("s")})
    err = _refused_and_stored_nothing(registry, folder, "config.json")
    assert err.details() == f"config.json: {problem}"


def test_adapter_config_values_of_the_wrong_type_are_invalid_argument(
    registry: Registry, tmp_path: Path
) -> None:
    base = registry.stub.UploadModelRevision(
        upload_requests(f"models/{unique('base')}", full_model(tmp_path / "base")), metadata=A
    )
    folder = adapter(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"r": "sixteen"}))
    err = _refused_and_stored_nothing(
        registry, folder, "adapter_config.json", pb.MODEL_FORMAT_LORA_ADAPTER, base.name
    )
    assert err.details() == "adapter_config.json: r: expected an integer"


def test_a_path_too_long_for_the_filesystem_is_invalid_argument(
    registry: Registry, tmp_path: Path
) -> None:
    folder = full_model(tmp_path)
    (folder / "notes.txt").write_text("x")
    manifest = folder_manifest(folder)
    index = [f.path for f in manifest.files].index("notes.txt")
    manifest.files[index].path = "n" * 300
    header = pb.ModelRevisionHeader(
        parent=f"models/{unique('long')}", format=pb.MODEL_FORMAT_FULL_WEIGHTS, manifest=manifest
    )
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadModelRevision(
            iter([pb.UploadModelRevisionRequest(header=header)]), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details(err.value)[1]] == [f"header.manifest.files[{index}].path"]
    nested = "/".join(["d" * 200] * 3)  # long, but every name fits: accepted
    manifest.files[index].path = nested
    (folder / "notes.txt").rename(tmp_path / "notes")
    (folder / nested).parent.mkdir(parents=True)
    (tmp_path / "notes").rename(folder / nested)
    rev = registry.stub.UploadModelRevision(
        upload_requests(f"models/{unique('long')}", folder), metadata=A
    )
    assert nested in [f.path for f in rev.manifest.files]


def test_the_migration_upgrades_a_database_of_the_first_schema(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from services.registry.store import MIGRATIONS, MetadataStore
    from services.specs.names import Collection
    from tlm.registry.v1 import registry_pb2

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = MetadataStore(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    store.create_resource("t", Collection.EVALUATORS, "e")  # data from before the upgrade
    store.migrate()

    def add() -> str:
        revision, _ = store.add_revision(
            "t",
            Collection.EVALUATORS,
            "e",
            request_id="",
            body=lambda _: registry_pb2.EvaluatorRevision(),
            blobs=[],
        )
        return revision.revision_id

    assert add() == "r1"
    store.delete_resource("t", Collection.EVALUATORS, "e")
    store.create_resource("t", Collection.EVALUATORS, "e")
    assert add() == "r2"
    store.close()
