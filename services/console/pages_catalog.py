"""The model square and the data square: models with revisions, aliases and lineage; datasets
by kind with row counts, a rows preview, and uploads with their row errors shown per row."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common import proto_json
from services.common.errors import InvalidArgument, NotFound
from services.console import views
from services.console.app import Console
from services.console.clients import Clients
from tlm.registry.v1 import registry_pb2 as rpb

PREVIEW_ROWS = 20
MAX_UPLOAD_BYTES = 256 << 20  # larger files go through `tlm datasets push`
KINDS = [k for k in proto_json.choices(rpb.DatasetKind)]  # "sft", "preference", ...


async def latest(clients: Clients, collection: str, resource: Any) -> Any | None:
    if not resource.latest_revision_id:
        return None
    try:
        return await clients.registry.get_revision(
            collection, f"{resource.name}/revisions/{resource.latest_revision_id}"
        )
    except NotFound:  # deleted between the two calls
        return None


def routes(console: Console) -> list[Route]:
    async def models(request: Request) -> Response:
        clients = console.clients(request)
        found = await clients.registry.list_resources("models")
        revisions = await asyncio.gather(
            *(clients.registry.list_revisions("models", m.name) for m in found)
        )
        return console.render(
            request,
            "models.html",
            models=list(zip(found, revisions, strict=True)),
            forest=views.lineage_forest([r for revs in revisions for r in revs]),
            fmt=lambda rev: views.enum_name_of(rev, "format"),
        )

    async def datasets(request: Request) -> Response:
        clients = console.clients(request)
        found = await clients.registry.list_resources("datasets")
        latest_revs = await asyncio.gather(*(latest(clients, "datasets", d) for d in found))
        by_kind: dict[str, list[tuple[Any, Any]]] = {k: [] for k in KINDS}
        for d, rev in zip(found, latest_revs, strict=True):
            by_kind[views.enum_name_of(d, "kind").lower()].append((d, rev))
        return console.render(request, "datasets.html", by_kind=by_kind, kinds=KINDS)

    async def dataset(request: Request) -> Response:
        clients = console.clients(request)
        name = f"datasets/{request.path_params['dataset']}"
        d = await clients.registry.get("datasets", name)
        rev = await latest(clients, "datasets", d)
        rows: list[dict[str, Any]] = []
        if rev is not None:
            async for row in clients.registry.read_dataset_rows(rev.name, limit=PREVIEW_ROWS):
                rows.append(row)
        columns = [c.name for c in rev.columns] if rev is not None else []
        return console.render(
            request,
            "dataset.html",
            dataset=d,
            revision=rev,
            rows=rows,
            columns=columns,
            kind=views.enum_name_of(d, "kind").lower(),
        )

    async def upload(request: Request) -> Response:
        """The file is the request body (the page's script sends it so); name, kind and
        description are query parameters."""
        q = request.query_params
        name, kind = q.get("name", "").strip(), q.get("kind", "")
        body = await request.body()
        problems = _upload_problems(name, kind, body)
        if problems:
            return console.render(request, "_upload_result.html", problems=problems)
        suffix = ".parquet" if q.get("filename", "").endswith(".parquet") else ".jsonl"
        fmt = rpb.DATASET_FORMAT_PARQUET if suffix == ".parquet" else rpb.DATASET_FORMAT_JSONL
        with tempfile.TemporaryDirectory(prefix="tlm-console-") as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(body)
            try:
                rev = await console.clients(request).registry.upload_dataset_file(
                    f"datasets/{name}",
                    path,
                    proto_json.enum_number(rpb.DatasetKind, kind),
                    format=fmt,
                    description=q.get("description", ""),
                )
            except InvalidArgument as exc:
                rows, other = views.row_errors(exc.violations)
                lines = (
                    body.decode(errors="replace").splitlines()
                    if fmt == rpb.DATASET_FORMAT_JSONL
                    else []
                )
                return console.render(
                    request,
                    "_upload_result.html",
                    problems=other or ([] if rows else [exc.message]),
                    row_errors=rows,
                    lines=lines,
                )
        return console.render(request, "_upload_result.html", revision=rev, problems=[])

    return [
        Route("/models", models),
        Route("/datasets", datasets),
        Route("/datasets/upload", upload, methods=["POST"]),
        Route("/datasets/{dataset}", dataset),
    ]


def _upload_problems(name: str, kind: str, body: bytes) -> list[str]:
    problems = []
    if not name:
        problems.append("name: give the dataset a name")
    if kind not in KINDS:
        problems.append(f"kind: choose one of {', '.join(KINDS)}")
    if not body:
        problems.append("file: choose a JSONL or Parquet file")
    if len(body) > MAX_UPLOAD_BYTES:
        problems.append(f"file: over {MAX_UPLOAD_BYTES >> 20} MiB; use `tlm datasets push`")
    return problems
