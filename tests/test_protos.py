"""The contracts: generated code matches protos/, and the protos follow our API conventions."""

from __future__ import annotations

import filecmp
import re
import shutil
from pathlib import Path

import pytest
from google.api import field_behavior_pb2  # registers the option, so descriptors parse it
from google.protobuf import descriptor_pb2

from services.devtools import protogen

TLM_FILES = "tlm/"


def _drift(generated: Path, committed: Path) -> list[str]:
    """Relative paths that differ between two generated trees (added, removed or changed)."""
    a = {p.relative_to(generated) for p in generated.rglob("*") if p.is_file()}
    b = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file()}
    b = {p for p in b if "__pycache__" not in p.parts}
    changed = [p for p in a & b if not filecmp.cmp(generated / p, committed / p, shallow=False)]
    return sorted(str(p) for p in (a ^ b) | set(changed))


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    protogen.generate(tmp_path / "gen")
    drift = _drift(tmp_path / "gen", protogen.DEFAULT_OUT)
    assert not drift, f"generated code is stale, run `make protos`: {drift}"


def test_vendored_google_protos_match_the_pinned_package() -> None:
    """protos/google/ is a byte copy of what googleapis-common-protos ships (the runtime the
    Python code imports), license headers included; our imports resolve inside protos/."""
    import google.rpc

    site = Path(next(iter(google.rpc.__path__))).parents[1]
    vendored = protogen.vendored_files()
    assert {str(p) for p in vendored} >= {
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
        "google/rpc/code.proto",
    }
    for rel in vendored:
        text = (protogen.PROTO_ROOT / rel).read_text()
        assert text.startswith("// Copyright") and "Apache License" in text, rel
        assert text == (site / rel).read_text(), f"{rel} differs from googleapis-common-protos"
    imports = {
        m
        for p in protogen.proto_files()
        for m in re.findall(r'^import "(google/(?!protobuf/)[^"]+)";', p.read_text(), re.M)
    }
    assert imports and imports <= {str(p) for p in vendored}, imports


def test_drift_check_catches_an_edited_proto(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(protogen.PROTO_ROOT, protos)
    rollout = protos / "tlm/rollout/v1/rollout.proto"
    rollout.write_text(
        rollout.read_text().replace(
            "message UnloadAdapterResponse {}",
            "message UnloadAdapterResponse {\n  // New.\n  string note = 1;\n}",
        )
    )
    protogen.generate(tmp_path / "gen", proto_root=protos)
    assert "tlm/rollout/v1/rollout_pb2.py" in _drift(tmp_path / "gen", protogen.DEFAULT_OUT)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    out = protogen.descriptor_set(tmp_path_factory.mktemp("ds") / "set.pb")
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return [f for f in fds.file if f.name.startswith(TLM_FILES)]


def test_packages_are_versioned_and_match_directories(files) -> None:  # type: ignore[no-untyped-def]
    assert {f.package for f in files} == {
        "tlm.common.v1",
        "tlm.deploy.v1",
        "tlm.registry.v1",
        "tlm.reward.v1",
        "tlm.rollout.v1",
        "tlm.trainer.v1",
    }
    for f in files:
        assert re.fullmatch(r"tlm\.[a-z]+\.v\d+", f.package)
        assert str(Path(f.name).parent).replace("/", ".") == f.package, f.name


def test_services_and_methods_follow_aip_naming(files) -> None:  # type: ignore[no-untyped-def]
    services = [(f, s) for f in files for s in f.service]
    assert len(services) == 5
    for f, service in services:
        assert service.name.endswith("Service"), service.name
        for m in service.method:
            assert m.input_type == f".{f.package}.{m.name}Request", m.name
            # Standard methods return the resource; the rest return MethodResponse.
            standard = re.match(r"(Get|Create|Update|Cancel|Set|Submit|Upload|Append)", m.name)
            if not standard:
                assert m.output_type.endswith(f"{m.name}Response") or m.name.startswith(
                    ("Download", "Watch", "Get")
                ), m.name


def _enums(files):  # type: ignore[no-untyped-def]
    for f in files:
        yield from f.enum_type
        stack = list(f.message_type)
        while stack:
            msg = stack.pop()
            yield from msg.enum_type
            stack.extend(msg.nested_type)


def test_enum_zero_values_are_unspecified(files) -> None:  # type: ignore[no-untyped-def]
    for enum in _enums(files):
        zero = enum.value[0]
        assert zero.number == 0 and zero.name.endswith("_UNSPECIFIED"), enum.name


def test_list_methods_paginate(files) -> None:  # type: ignore[no-untyped-def]
    messages = {f".{f.package}.{m.name}": m for f in files for m in f.message_type}
    for f in files:
        for service in f.service:
            for m in service.method:
                if m.name.startswith("List") and m.name != "ListScorerTypes":
                    req = {x.name for x in messages[m.input_type].field}
                    resp = {x.name for x in messages[m.output_type].field}
                    assert {"page_size", "page_token"} <= req, m.name
                    assert "next_page_token" in resp, m.name


def test_every_message_field_and_method_has_a_comment(files) -> None:  # type: ignore[no-untyped-def]
    missing = []
    for f in files:
        documented = {
            tuple(loc.path)
            for loc in f.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()
        }

        def check(path, what, documented=documented, f=f):  # type: ignore[no-untyped-def]
            if tuple(path) not in documented:
                missing.append(f"{f.name}: {what}")

        def walk(msg, path, check=check):  # type: ignore[no-untyped-def]
            check(path, msg.name)
            for i, field in enumerate(msg.field):
                check((*path, 2, i), f"{msg.name}.{field.name}")
            for i, nested in enumerate(msg.nested_type):
                if not nested.options.map_entry:
                    walk(nested, (*path, 3, i))

        for i, msg in enumerate(f.message_type):
            walk(msg, (4, i))
        for i, enum in enumerate(f.enum_type):
            check((5, i), enum.name)
            for j, value in enumerate(enum.value):
                check((5, i, 2, j), f"{enum.name}.{value.name}")
        for i, service in enumerate(f.service):
            check((6, i), service.name)
            for j, method in enumerate(service.method):
                check((6, i, 2, j), f"{service.name}.{method.name}")
    assert not missing, missing


def _behaviours(field: descriptor_pb2.FieldDescriptorProto) -> set[str]:
    behaviours = field.options.Extensions[field_behavior_pb2.field_behavior]
    return {field_behavior_pb2.FieldBehavior.Name(b) for b in behaviours}


def _commented_fields(files):  # type: ignore[no-untyped-def]
    """(file, message, field, its comment) for every field of every top-level message."""
    for f in files:
        comments = {
            tuple(loc.path): loc.leading_comments + loc.trailing_comments
            for loc in f.source_code_info.location
        }
        for i, msg in enumerate(f.message_type):
            for j, field in enumerate(msg.field):
                yield f, msg, field, comments.get((4, i, 2, j), "")


def test_request_fields_say_whether_they_are_required(files) -> None:  # type: ignore[no-untyped-def]
    """AIP-203: every field of a request (and of an upload's header) is REQUIRED or OPTIONAL,
    so clients in any language see which ones the service refuses to go without."""
    unmarked = [
        f"{msg.name}.{field.name}: {sorted(_behaviours(field))}"
        for _f, msg, field, _ in _commented_fields(files)
        if msg.name.endswith(("Request", "Header"))
        and len(_behaviours(field) & {"REQUIRED", "OPTIONAL"}) != 1
    ]
    assert not unmarked, unmarked


def test_resources_mark_their_identifier_and_what_the_service_sets(files) -> None:  # type: ignore[no-untyped-def]
    """A resource (its `name` is a "Resource name") has `name` IDENTIFIER, every field
    annotated, and its times and revision ids OUTPUT_ONLY."""
    resources = {
        msg.name
        for f, msg, field, comment in _commented_fields(files)
        if field.name == "name" and comment.strip().startswith("Resource name")
    }
    assert {"Model", "DatasetRevision", "TrainingJob", "Review"} <= resources
    wrong = []
    for _f, msg, field, _ in _commented_fields(files):
        if msg.name not in resources:
            continue
        have = _behaviours(field)
        expected = (
            {"IDENTIFIER"}
            if field.name == "name"
            else {"OUTPUT_ONLY"}
            if field.name.endswith(("_time", "revision_id"))
            else None
        )
        if not have or (expected is not None and have != expected):
            wrong.append(f"{msg.name}.{field.name}: {sorted(have)}, expected {expected or 'any'}")
    assert not wrong, wrong


def test_field_comments_and_annotations_agree(files) -> None:  # type: ignore[no-untyped-def]
    """What a comment says (`(required, > 0)`, `output only`) the annotation says too, and no
    field is both required and optional or both set by the client and output only."""
    wrong = []
    for _f, msg, field, comment in _commented_fields(files):
        have, text = _behaviours(field), comment.lower()
        if "(required" in text and "REQUIRED" not in have:
            wrong.append(f"{msg.name}.{field.name}: comment says required")
        if "output only" in text and "OUTPUT_ONLY" not in have:
            wrong.append(f"{msg.name}.{field.name}: comment says output only")
        if len(have & {"REQUIRED", "OPTIONAL", "OUTPUT_ONLY"}) > 1:
            wrong.append(f"{msg.name}.{field.name}: {sorted(have)}")
    assert not wrong, wrong
