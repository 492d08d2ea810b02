"""Update methods with a FieldMask (AIP-134) on a real registry: description and labels change,
the etag guards them, and fields the mask may not name are refused by their mask index."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from tests.registry.conftest import A, B, Registry, details, unique
from tlm.registry.v1 import registry_pb2 as pb


def _create(registry: Registry, coll: str) -> Any:
    """A fresh resource of `coll` with a description and one label."""
    s, rid = registry.stub, unique(coll)
    if coll == "model":
        return s.CreateModel(
            pb.CreateModelRequest(model_id=rid, description="old", labels={"a": "1"}), metadata=A
        )
    if coll == "dataset":
        request = pb.CreateDatasetRequest(
            dataset_id=rid, kind=pb.DATASET_KIND_SFT, description="old", labels={"a": "1"}
        )
        return s.CreateDataset(request, metadata=A)
    return s.CreateEvaluator(
        pb.CreateEvaluatorRequest(evaluator_id=rid, description="old", labels={"a": "1"}),
        metadata=A,
    )


def _update(registry: Registry, resource: Any, paths: list[str] | None, **kw: Any) -> Any:
    """Update{Model,Dataset,Evaluator} with `resource` and a mask of `paths` (None: no mask)."""
    kind = resource.DESCRIPTOR.name
    request = getattr(pb, f"Update{kind}Request")(**{kind.lower(): resource})
    if paths is not None:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    return getattr(registry.stub, f"Update{kind}")(request, metadata=kw.get("metadata", A))


def _refused(registry: Registry, resource: Any, paths: list[str] | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _update(registry, resource, paths)
    return err.value


COLLECTIONS = ["model", "dataset", "evaluator"]


@pytest.mark.parametrize("coll", COLLECTIONS)
def test_update_changes_only_the_masked_fields(registry: Registry, coll: str) -> None:
    created = _create(registry, coll)
    wanted = type(created)(
        name=created.name, description="new", labels={"b": "2"}, etag=created.etag
    )
    only_labels = _update(registry, wanted, ["labels"])
    assert (only_labels.description, dict(only_labels.labels)) == ("old", {"b": "2"})
    assert only_labels.etag != created.etag and only_labels.update_time != created.update_time
    both = _update(registry, type(created)(name=created.name, description="new"), ["*"])
    assert (both.description, dict(both.labels)) == ("new", {})  # "*": labels cleared
    # No mask: the updatable fields that are set, here only the description.
    implied = _update(registry, type(created)(name=created.name, description="newer"), None)
    assert (implied.description, dict(implied.labels)) == ("newer", {})
    got = getattr(registry.stub, f"Get{type(created).DESCRIPTOR.name}")(
        getattr(pb, f"Get{type(created).DESCRIPTOR.name}Request")(name=created.name), metadata=A
    )
    assert (got.description, got.etag) == ("newer", implied.etag)  # stored, not just echoed


@pytest.mark.parametrize("coll", COLLECTIONS)
def test_a_stale_etag_is_aborted(registry: Registry, coll: str) -> None:
    created = _create(registry, coll)
    _update(registry, type(created)(name=created.name, description="x"), ["description"])
    stale = type(created)(name=created.name, description="y", etag=created.etag)
    err = _refused(registry, stale, ["description"])
    assert err.code() == grpc.StatusCode.ABORTED
    assert "re-read it and retry" in (err.details() or "")


@pytest.mark.parametrize("coll", COLLECTIONS)
def test_unknown_and_immutable_paths_are_refused_by_index(registry: Registry, coll: str) -> None:
    created = _create(registry, coll)
    resource = type(created)(name=created.name, description="z")
    err = _refused(registry, resource, ["description", "colour", "name", "aliases"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, violations = details(err)
    assert [f for f, _ in violations] == [
        "update_mask.paths[1]",
        "update_mask.paths[2]",
        "update_mask.paths[3]",
    ]
    assert "'colour' is not a field" in violations[0][1]
    assert "cannot be changed" in violations[1][1]
    assert f"Set{type(created).DESCRIPTOR.name}Alias" in violations[2][1]
    # Nothing changed: the whole update is refused.
    again = _update(registry, type(created)(name=created.name), ["labels"])
    assert again.description == "old"


def test_dataset_kind_is_immutable_and_an_empty_update_is_refused(registry: Registry) -> None:
    created = _create(registry, "dataset")
    err = _refused(registry, pb.Dataset(name=created.name, kind=pb.DATASET_KIND_PROMPT), ["kind"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details(err)[1]] == ["update_mask.paths[0]"]
    err = _refused(registry, pb.Dataset(name=created.name), None)  # nothing set, no mask
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details(err)[1]] == ["update_mask"]


def test_update_names_are_checked_and_scoped_by_team(registry: Registry) -> None:
    created = _create(registry, "model")
    err = _refused(registry, pb.Model(name="datasets/x", description="d"), ["description"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details(err)[1]] == ["model.name"]
    with pytest.raises(grpc.RpcError) as other_team:
        _update(registry, pb.Model(name=created.name, description="d"), ["description"], metadata=B)
    assert other_team.value.code() == grpc.StatusCode.NOT_FOUND
