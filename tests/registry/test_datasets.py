"""Datasets through the real API, on SQLite and PostgreSQL: validation of every kind, every bad
input named in the contract, and that a refused upload stores nothing."""

from __future__ import annotations

import functools
import io
import json
import operator

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.registry.conftest import A, B, Registry, dataset_requests, details, unique
from tlm.registry.v1 import registry_pb2 as pb


def jsonl(rows: list[object]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def upload(registry: Registry, data: bytes, kind: int, name: str | None = None, **kw: object):  # type: ignore[no-untyped-def]
    parent = f"datasets/{name or unique('ds')}"
    return parent, registry.stub.UploadDatasetRevision(
        dataset_requests(parent, data, kind, **kw),
        metadata=A,
        timeout=30,  # type: ignore[arg-type]
    )


def refused(registry: Registry, data: bytes, kind: int, code: grpc.StatusCode, **kw: object):  # type: ignore[no-untyped-def]
    parent = f"datasets/{unique('bad')}"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadDatasetRevision(
            dataset_requests(parent, data, kind, **kw),
            metadata=A,
            timeout=30,  # type: ignore[arg-type]
        )
    assert err.value.code() == code, err.value.details()
    # Nothing was stored: not even the dataset the upload would have created.
    with pytest.raises(grpc.RpcError) as missing:
        registry.stub.GetDataset(pb.GetDatasetRequest(name=parent), metadata=A)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    return err.value


GOOD = {
    pb.DATASET_KIND_SFT: [
        {"prompt": "2+2?", "completion": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ],
    pb.DATASET_KIND_PREFERENCE: [{"prompt": "p", "chosen": "good", "rejected": "bad"}],
    pb.DATASET_KIND_UNPAIRED_PREFERENCE: [{"prompt": "p", "completion": "c", "label": True}],
    pb.DATASET_KIND_PROMPT: [{"prompt": "What is 6*7?", "reference": "42", "difficulty": "easy"}],
}


@pytest.mark.parametrize("kind", list(GOOD))
def test_each_kind_accepts_its_rows(registry: Registry, kind: int) -> None:
    _, rev = upload(registry, jsonl(GOOD[kind]), kind)
    assert rev.kind == kind and rev.row_count == len(GOOD[kind]) and rev.revision_id == "r1"
    assert rev.size_bytes > 0 and len(rev.sha256) == 64 and "latest" in rev.aliases


def test_stats_and_schema(registry: Registry) -> None:
    rows = [{"prompt": "x" * n, "reference": str(n)} for n in range(1, 101)]
    _, rev = upload(registry, jsonl(rows), pb.DATASET_KIND_PROMPT)
    cols = {c.name: (c.type, c.present_count) for c in rev.columns}
    assert cols == {"prompt": ("string", 100), "reference": ("string", 100)}
    stats = rev.length_stats["prompt"]
    # Lengths 1..100: index int(q * 100) of the sorted list.
    assert (stats.min, stats.p50, stats.p90, stats.p99, stats.max) == (1, 51, 91, 100, 100)
    assert stats.mean == pytest.approx(50.5)


def test_wrong_columns_for_the_kind_say_what_the_kind_needs(registry: Registry) -> None:
    sft_rows = [{"prompt": "p", "completion": "c"}] * 3
    err = refused(
        registry, jsonl(sft_rows), pb.DATASET_KIND_PREFERENCE, grpc.StatusCode.INVALID_ARGUMENT
    )
    reason, violations = details(err)
    assert reason == "DATASET_ROWS_INVALID"
    assert violations[0][0] == "rows[0].chosen"
    assert "needs columns prompt, chosen, rejected" in violations[0][1]
    assert "completion, prompt" in violations[0][1]  # what the row has
    # The first errors are all reported, not only the first one.
    assert [v[0] for v in violations] == [
        "rows[0].chosen",
        "rows[0].rejected",
        "rows[1].chosen",
        "rows[1].rejected",
        "rows[2].chosen",
        "rows[2].rejected",
    ]
    assert "3 of 3 rows are invalid" in err.details()


@pytest.mark.parametrize(
    ("data", "field", "text"),
    [
        (b'{"prompt": "p", "completion": "c"}\n{not json}\n', "rows[1]", "line 2: not JSON"),
        (b'{"prompt": "p", "completion": "\xff\xfe"}\n', "rows[0]", "not UTF-8"),
        (b'["a list"]\n', "rows[0]", "must be a JSON object"),
        (
            jsonl([{"prompt": "p", "completion": "c", "label": "yes"}]),
            "rows[0].label",
            "must be a boolean",
        ),
    ],
)
def test_bad_lines_name_row_and_field(
    registry: Registry, data: bytes, field: str, text: str
) -> None:
    kind = pb.DATASET_KIND_UNPAIRED_PREFERENCE if b"label" in data else pb.DATASET_KIND_SFT
    err = refused(registry, data, kind, grpc.StatusCode.INVALID_ARGUMENT)
    _, violations = details(err)
    assert violations[0][0] == field and text in violations[0][1], violations


def test_empty_chosen_and_bad_messages(registry: Registry) -> None:
    rows = [
        {"prompt": "p", "chosen": "", "rejected": "r"},
        {"prompt": "p", "chosen": [{"role": "wizard", "content": "x"}], "rejected": "r"},
    ]
    _, violations = details(
        refused(registry, jsonl(rows), pb.DATASET_KIND_PREFERENCE, grpc.StatusCode.INVALID_ARGUMENT)
    )
    assert violations[0] == ("rows[0].chosen", "line 1: must not be empty")
    assert violations[1][0] == "rows[1].chosen" and "role 'wizard'" in violations[1][1]


def test_line_over_the_size_limit(registry: Registry) -> None:
    row = {"prompt": "p", "completion": "x" * (1024 * 1024 + 10)}
    _, violations = details(
        refused(registry, jsonl([row]), pb.DATASET_KIND_SFT, grpc.StatusCode.INVALID_ARGUMENT)
    )
    assert violations[0][0] == "rows[0]" and "over the 1048576 limit" in violations[0][1]


def test_empty_file(registry: Registry) -> None:
    refused(registry, b"", pb.DATASET_KIND_SFT, grpc.StatusCode.INVALID_ARGUMENT)
    refused(registry, b"\n\n", pb.DATASET_KIND_SFT, grpc.StatusCode.INVALID_ARGUMENT)


def test_sha256_mismatch_stores_nothing(registry: Registry) -> None:
    data = jsonl(GOOD[pb.DATASET_KIND_SFT])
    err = refused(
        registry, data, pb.DATASET_KIND_SFT, grpc.StatusCode.INVALID_ARGUMENT, sha="0" * 64
    )
    assert details(err)[0] == "CHECKSUM_MISMATCH"


def test_stream_that_stops_midway_stores_nothing(registry: Registry) -> None:
    data = jsonl(GOOD[pb.DATASET_KIND_SFT] * 50)
    err = refused(
        registry,
        data,
        pb.DATASET_KIND_SFT,
        grpc.StatusCode.INVALID_ARGUMENT,
        cut=len(data) // 2,
        chunk=100,
    )
    assert details(err)[0] == "UPLOAD_INCOMPLETE"


@pytest.mark.parametrize("name", ["a/b", "..", "x..y", "UPPER", "", "../etc", "a b"])
def test_names_that_could_be_paths_are_refused(registry: Registry, name: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.CreateDataset(
            pb.CreateDatasetRequest(dataset_id=name, kind=pb.DATASET_KIND_SFT), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, violations = details(err.value)
    assert reason == "INVALID_NAME" and violations[0][0] == "dataset_id"
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UploadDatasetRevision(
            dataset_requests(f"datasets/{name}", b"{}", pb.DATASET_KIND_SFT), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_duplicate_name_and_kind_mismatch(registry: Registry) -> None:
    name = unique("dup")
    registry.stub.CreateDataset(
        pb.CreateDatasetRequest(dataset_id=name, kind=pb.DATASET_KIND_SFT), metadata=A
    )
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.CreateDataset(
            pb.CreateDatasetRequest(dataset_id=name, kind=pb.DATASET_KIND_SFT), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        upload(
            registry, jsonl(GOOD[pb.DATASET_KIND_PREFERENCE]), pb.DATASET_KIND_PREFERENCE, name=name
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is of kind DATASET_KIND_SFT" in err.value.details()


def test_retry_with_the_same_request_id_returns_the_same_revision(registry: Registry) -> None:
    name = unique("idem")
    data = jsonl(GOOD[pb.DATASET_KIND_SFT])
    _, first = upload(registry, data, pb.DATASET_KIND_SFT, name=name, request_id="req-1")
    _, again = upload(registry, data, pb.DATASET_KIND_SFT, name=name, request_id="req-1")
    _, other = upload(registry, data, pb.DATASET_KIND_SFT, name=name, request_id="req-2")
    assert first.name == again.name == f"datasets/{name}/revisions/r1"
    assert other.revision_id == "r2"


def test_parquet_upload(registry: Registry) -> None:
    table = pa.table({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["z", "w"]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _, rev = upload(
        registry, buf.getvalue(), pb.DATASET_KIND_PREFERENCE, fmt=pb.DATASET_FORMAT_PARQUET
    )
    assert rev.row_count == 2
    err = refused(
        registry,
        b"not parquet at all",
        pb.DATASET_KIND_PREFERENCE,
        grpc.StatusCode.INVALID_ARGUMENT,
        fmt=pb.DATASET_FORMAT_PARQUET,
    )
    assert "not Parquet" in err.details()


def test_sharded_shuffled_reads_partition_the_rows(registry: Registry) -> None:
    rows = [{"prompt": f"q{i}", "reference": str(i)} for i in range(23)]
    parent, rev = upload(registry, jsonl(rows), pb.DATASET_KIND_PROMPT)

    def read(**kw: object) -> list[int]:
        request = pb.ReadDatasetRowsRequest(name=f"{parent}/revisions/latest", batch_size=4, **kw)  # type: ignore[arg-type]
        return [
            i
            for batch in registry.stub.ReadDatasetRows(request, metadata=A)
            for i in batch.row_indices
        ]

    assert read() == list(range(23))
    shards = [read(shard_index=i, shard_count=3, shuffle=True, shuffle_seed=7) for i in range(3)]
    assert sorted(functools.reduce(operator.iadd, shards, [])) == list(
        range(23)
    )  # disjoint and complete
    assert [len(s) for s in shards] == [8, 8, 7]
    assert shards[0] == read(shard_index=0, shard_count=3, shuffle=True, shuffle_seed=7)
    assert shards[0] != read(shard_index=0, shard_count=3, shuffle=True, shuffle_seed=8)
    assert read(offset=20) == [20, 21, 22] and read(offset=2, limit=2) == [2, 3]
    request = pb.ReadDatasetRowsRequest(name=rev.name, limit=1)
    (batch,) = registry.stub.ReadDatasetRows(request, metadata=A)
    assert dict(batch.rows[0]) == {"prompt": "q0", "reference": "0"}
    with pytest.raises(grpc.RpcError) as err:
        list(
            registry.stub.ReadDatasetRows(
                pb.ReadDatasetRowsRequest(name=rev.name, shard_index=3, shard_count=3), metadata=A
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_append_rows_makes_a_new_revision(registry: Registry) -> None:
    name = unique("human")
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    first = registry.stub.AppendDatasetRows(
        pb.AppendDatasetRowsRequest(
            parent=f"datasets/{name}",
            kind=pb.DATASET_KIND_PREFERENCE,
            rows=[_struct(r) for r in rows],
        ),
        metadata=A,
    )
    second = registry.stub.AppendDatasetRows(
        pb.AppendDatasetRowsRequest(parent=f"datasets/{name}", rows=[_struct(r) for r in rows * 2]),
        metadata=A,
    )
    assert (first.row_count, second.row_count) == (1, 3)
    assert second.parent_revision == first.name
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.AppendDatasetRows(
            pb.AppendDatasetRowsRequest(parent=f"datasets/{name}", rows=[_struct({"prompt": "p"})]),
            metadata=A,
        )
    assert details(err.value)[1][0][0] == "rows[0].chosen"


def _struct(row: dict[str, object]):  # type: ignore[no-untyped-def]
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update(row)
    return s


def test_other_teams_see_nothing(registry: Registry) -> None:
    parent, rev = upload(registry, jsonl(GOOD[pb.DATASET_KIND_SFT]), pb.DATASET_KIND_SFT)
    for call, request in [
        (registry.stub.GetDataset, pb.GetDatasetRequest(name=parent)),
        (registry.stub.GetDatasetRevision, pb.GetDatasetRevisionRequest(name=rev.name)),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=B)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = registry.stub.ListDatasets(pb.ListDatasetsRequest(page_size=1000), metadata=B)
    assert parent not in [d.name for d in listed.datasets]


def test_list_paginates_and_filters(registry: Registry) -> None:
    prefix = unique("page")
    for i in range(5):
        registry.stub.CreateDataset(
            pb.CreateDatasetRequest(
                dataset_id=f"{prefix}-{i}",
                kind=pb.DATASET_KIND_SFT if i % 2 else pb.DATASET_KIND_PROMPT,
                labels={"team": "x", "i": str(i)},
            ),
            metadata=A,
        )
    names, token = [], ""
    while True:
        page = registry.stub.ListDatasets(
            pb.ListDatasetsRequest(page_size=2, page_token=token, name_prefix=prefix), metadata=A
        )
        names += [d.name for d in page.datasets]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"datasets/{prefix}-{i}" for i in range(5)]
    sft = registry.stub.ListDatasets(
        pb.ListDatasetsRequest(name_prefix=prefix, kind=pb.DATASET_KIND_SFT), metadata=A
    )
    assert [d.name[-1] for d in sft.datasets] == ["1", "3"]
    labelled = registry.stub.ListDatasets(
        pb.ListDatasetsRequest(name_prefix=prefix, labels={"i": "4"}), metadata=A
    )
    assert [d.name[-1] for d in labelled.datasets] == ["4"]
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.ListDatasets(
            pb.ListDatasetsRequest(page_token=page.next_page_token or "bogus"), metadata=A
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
