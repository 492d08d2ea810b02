"""Metadata storage: resources and immutable revisions in SQL (SQLite or PostgreSQL).

Synchronous SQLAlchemy; the servicer calls it through `asyncio.to_thread`. Every query is
scoped by team, so another team's resources are simply not found.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf import json_format
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common import proto_json, sql
from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, field_error
from services.registry.domain import (
    BODY_TYPES,
    BaseRevisionGone,
    Resource,
    ResourceChanges,
    Revision,
    RevisionBody,
    StaleBase,
    revision_aliases,
)
from services.registry.tables import ResourceRow, RetiredNameRow, RevisionRow
from services.specs.names import LATEST, Collection, check_id, is_revision_id, revision_id

MIGRATIONS = Path(__file__).parent / "migrations"
# Alembic's default name: registry databases made before the other stores had migrations
# record their revision there.
VERSION_TABLE = "alembic_version"


def _now() -> datetime:
    return datetime.now(UTC)


def _resource(row: ResourceRow) -> Resource:
    return Resource(
        team=row.team,
        collection=Collection(row.collection),
        resource_id=row.resource_id,
        description=row.description,
        labels=dict(row.labels or {}),
        dataset_kind=row.dataset_kind,
        aliases=dict(row.aliases or {}),
        etag=row.etag,
        latest_revision_id=revision_id(row.last_seq) if row.last_seq else "",
        create_time=sql.utc(row.create_time),
        update_time=sql.utc(row.update_time),
    )


def _revision(row: RevisionRow, parent: Resource) -> Revision:
    # Bodies stored before the enum rename carry v1.0 names (`LORA_ADAPTER`): they still load.
    body = proto_json.parse_dict(
        row.body, BODY_TYPES[parent.collection](), ignore_unknown_fields=True
    )
    return Revision(
        parent,
        row.seq,
        row.request_id,
        body,
        list(row.blobs),
        sql.utc(row.create_time),
        revision_aliases(parent, row.seq),
    )


def _check_etag(row: ResourceRow, etag: str) -> None:
    """An etag the caller read must still be current (empty skips the check)."""
    if etag and etag != row.etag:
        raise Aborted(
            f"{row.collection}/{row.resource_id} changed since etag {etag}; re-read it and retry",
            metadata={"current_etag": row.etag},
        )


def _name_key(row: ResourceRow) -> dict[str, str]:
    return {"team": row.team, "collection": row.collection, "resource_id": row.resource_id}


class MetadataStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sql.make_engine(url)

    def _write(self) -> AbstractContextManager[Session]:
        """A session in a write transaction (on SQLite: BEGIN IMMEDIATE)."""
        return sql.write_session(self.engine)

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        sql.migrate(self.engine, MIGRATIONS, VERSION_TABLE)

    def close(self) -> None:
        self.engine.dispose()

    # Resources ----------------------------------------------------------------------------

    def _row(
        self, s: Session, team: str, coll: Collection, rid: str, lock: bool = False
    ) -> ResourceRow:
        query = select(ResourceRow).where(
            ResourceRow.team == team,
            ResourceRow.collection == coll.value,
            ResourceRow.resource_id == rid,
        )
        if lock:
            query = query.with_for_update()
        row = s.scalars(query).first()
        if row is None:
            raise NotFound(f"{coll}/{rid} not found", metadata={"resource": f"{coll}/{rid}"})
        return row

    def create_resource(
        self,
        team: str,
        coll: Collection,
        rid: str,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        dataset_kind: int = 0,
        exist_ok: bool = False,
    ) -> Resource:
        try:
            return self._insert_resource(team, coll, rid, description, labels, dataset_kind)
        except IntegrityError:  # it exists, or a concurrent create won the race
            if exist_ok:
                return self.get_resource(team, coll, rid)
            raise AlreadyExists(
                f"{coll}/{rid} already exists", metadata={"resource": f"{coll}/{rid}"}
            ) from None

    def _insert_resource(
        self,
        team: str,
        coll: Collection,
        rid: str,
        description: str,
        labels: Mapping[str, str] | None,
        dataset_kind: int,
    ) -> Resource:
        with self._write() as s:
            now = _now()
            row = ResourceRow(
                team=team,
                collection=coll.value,
                resource_id=rid,
                description=description,
                labels=dict(labels or {}),
                dataset_kind=dataset_kind,
                aliases={},
                etag=secrets.token_hex(8),
                last_seq=0,
                create_time=now,
                update_time=now,
            )
            s.add(row)
            s.flush()
            return _resource(row)

    def get_resource(self, team: str, coll: Collection, rid: str) -> Resource:
        with Session(self.engine) as s:
            return _resource(self._row(s, team, coll, rid))

    def list_resources(
        self,
        team: str,
        coll: Collection,
        *,
        after: str | None,
        limit: int,
        prefix: str = "",
        labels: Mapping[str, str] | None = None,
        dataset_kind: int = 0,
    ) -> list[Resource]:
        """Up to `limit` resources ordered by id, after id `after`, matching every filter."""
        query = select(ResourceRow).where(
            ResourceRow.team == team, ResourceRow.collection == coll.value
        )
        if prefix:
            query = query.where(ResourceRow.resource_id.startswith(prefix, autoescape=True))
        if dataset_kind:
            query = query.where(ResourceRow.dataset_kind == dataset_kind)
        if after:
            query = query.where(ResourceRow.resource_id > after)
        wanted = dict(labels or {})
        result: list[Resource] = []
        with Session(self.engine) as s:
            # Labels are JSON; filter them here, reading in id order until the page is full.
            for row in s.scalars(query.order_by(ResourceRow.resource_id)).yield_per(200):
                if all(row.labels.get(k) == v for k, v in wanted.items()):
                    result.append(_resource(row))
                    if len(result) > limit:
                        break
        return result

    def delete_resource(self, team: str, coll: Collection, rid: str) -> list[str]:
        """Delete a resource and its revisions; returns the blob keys they referenced. A model
        that other models' revisions name as their base is refused. The check and the delete
        share one transaction holding the row's lock, which an upload based on this model
        takes too (`add_revision(base=...)`): either the delete sees the new revision, or the
        upload sees its base gone. Never both succeed."""
        with self._write() as s:
            row = self._row(s, team, coll, rid, lock=True)
            if coll == Collection.MODELS:
                raise_if_referenced(self._dependants(s, row), f"{coll}/{rid}")
            self._retire(s, row)
            revisions = list(
                s.scalars(select(RevisionRow).where(RevisionRow.resource_pk == row.pk))
            )
            blobs = [b for rev in revisions for b in rev.blobs]
            for rev in revisions:
                s.delete(rev)
            s.flush()
            s.delete(row)
            return blobs

    def _retire(self, s: Session, row: ResourceRow) -> None:
        """Remember how far the name's revision numbers went (see RetiredNameRow)."""
        if not row.last_seq:
            return
        key = _name_key(row)
        # Deletes of one name are serial (a row of that name can be created again only once
        # the last delete committed), so this read-then-write never races another.
        retired = s.get(RetiredNameRow, key, with_for_update=True)
        if retired is None:
            s.add(RetiredNameRow(**key, last_seq=row.last_seq))
        else:
            retired.last_seq = max(retired.last_seq, row.last_seq)

    def _retired_seq(self, s: Session, row: ResourceRow) -> int:
        retired = s.get(RetiredNameRow, _name_key(row))
        return retired.last_seq if retired is not None else 0

    def _has_revision(self, s: Session, row: ResourceRow, seq: int) -> bool:
        if not 0 < seq <= row.last_seq:  # also keeps huge numbers out of the query
            return False
        query = select(RevisionRow.pk).where(
            RevisionRow.resource_pk == row.pk, RevisionRow.seq == seq
        )
        return s.scalars(query).first() is not None

    def set_alias(
        self, team: str, coll: Collection, rid: str, alias: str, target: str, etag: str
    ) -> Resource:
        check_id(alias, "alias")
        if alias == LATEST or is_revision_id(alias):
            raise field_error("alias", f"{alias!r} is reserved; pick a name such as 'prod'")
        if target and not is_revision_id(target):
            raise field_error("revision_id", f"{target[:80]!r} is not a revision id such as 'r3'")
        with self._write() as s:
            row = self._row(s, team, coll, rid, lock=True)
            _check_etag(row, etag)
            aliases = dict(row.aliases or {})
            if target:
                if not self._has_revision(s, row, int(target[1:])):
                    raise NotFound(f"{coll}/{rid}/revisions/{target} not found")
                aliases[alias] = target
            elif alias not in aliases:
                raise NotFound(f"alias {alias!r} of {coll}/{rid} not found")
            else:
                del aliases[alias]
            row.aliases = aliases
            row.etag = secrets.token_hex(8)
            row.update_time = _now()
            s.flush()
            return _resource(row)

    def update_resource(
        self, team: str, coll: Collection, rid: str, changes: ResourceChanges, etag: str
    ) -> Resource:
        """Apply `changes` under the row's lock; a non-empty `etag` must be the current one."""
        with self._write() as s:
            row = self._row(s, team, coll, rid, lock=True)
            _check_etag(row, etag)
            if changes.description is not None:
                row.description = changes.description
            if changes.labels is not None:
                row.labels = dict(changes.labels)
            row.etag = secrets.token_hex(8)
            row.update_time = _now()
            s.flush()
            return _resource(row)

    # Revisions ----------------------------------------------------------------------------

    def add_revision(
        self,
        team: str,
        coll: Collection,
        rid: str,
        *,
        request_id: str,
        body: Callable[[str], RevisionBody],
        blobs: list[str],
        create_parent: Callable[[], Resource] | None = None,
        expect_seq: int | None = None,
        base: Revision | None = None,
    ) -> tuple[Revision, bool]:
        """Append a revision atomically. `body(revision_id)` builds its facts (stored as proto3
        JSON, so that new facts need no migration). Returns it and
        whether it is new; a known request_id returns the earlier revision unchanged. With
        `expect_seq`, raise StaleBase unless the newest revision is still that one. With
        `base` (a revision of this collection it is built on), raise BaseRevisionGone unless
        `base` still exists when this one is stored. Numbers continue after a deleted
        resource of the same name, never reusing its revision ids."""
        if create_parent is not None:
            try:
                self.get_resource(team, coll, rid)
            except NotFound:
                create_parent()
        with self._write() as s:
            row = self._lock_with_base(s, team, coll, rid, base)
            if request_id:
                earlier = s.scalars(
                    select(RevisionRow).where(
                        RevisionRow.resource_pk == row.pk, RevisionRow.request_id == request_id
                    )
                ).first()
                if earlier is not None:
                    return _revision(earlier, _resource(row)), False
            if expect_seq is not None and row.last_seq != expect_seq:
                raise StaleBase(f"{coll}/{rid} gained a revision meanwhile")
            seq = (row.last_seq or self._retired_seq(s, row)) + 1
            now = _now()
            rev = RevisionRow(
                resource_pk=row.pk,
                seq=seq,
                request_id=request_id,
                body=json_format.MessageToDict(body(revision_id(seq))),
                blobs=blobs,
                create_time=now,
            )
            s.add(rev)
            row.last_seq = seq
            row.etag = secrets.token_hex(8)
            row.update_time = now
            s.flush()
            return _revision(rev, _resource(row)), True

    def _lock_with_base(
        self, s: Session, team: str, coll: Collection, rid: str, base: Revision | None
    ) -> ResourceRow:
        """Lock the resource's row and, with `base`, the base's row too (the lock a delete of
        the base takes), then check the base revision still exists. Rows lock in pk order, so
        two uploads based on each other's models cannot deadlock."""
        if base is None:
            return self._row(s, team, coll, rid, lock=True)
        ids = {rid, base.parent.resource_id}
        query = (
            select(ResourceRow)
            .where(
                ResourceRow.team == team,
                ResourceRow.collection == coll.value,
                ResourceRow.resource_id.in_(ids),
            )
            .order_by(ResourceRow.pk)
            .with_for_update()
        )
        rows = {r.resource_id: r for r in s.scalars(query)}
        if rid not in rows:
            raise NotFound(f"{coll}/{rid} not found", metadata={"resource": f"{coll}/{rid}"})
        base_row = rows.get(base.parent.resource_id)
        if base_row is None or not self._has_revision(s, base_row, base.seq):
            raise BaseRevisionGone(
                f"{base.name} was deleted before this revision was stored",
                metadata={"resource": base.name},
            )
        return rows[rid]

    def find_request(
        self, team: str, coll: Collection, rid: str, request_id: str
    ) -> Revision | None:
        """The revision an earlier call with this request_id created, if any."""
        if not request_id:
            return None
        with Session(self.engine) as s:
            try:
                row = self._row(s, team, coll, rid)
            except NotFound:
                return None
            rev = s.scalars(
                select(RevisionRow).where(
                    RevisionRow.resource_pk == row.pk, RevisionRow.request_id == request_id
                )
            ).first()
            return None if rev is None else _revision(rev, _resource(row))

    def get_revision(self, team: str, coll: Collection, rid: str, ref: str) -> Revision:
        """A revision by id ("r3"), "latest" or a user alias."""
        with Session(self.engine) as s:
            row = self._row(s, team, coll, rid)
            target = ref
            if ref == LATEST:
                target = revision_id(row.last_seq) if row.last_seq else ""
            elif not is_revision_id(ref):
                target = (row.aliases or {}).get(ref, "")
            rev = None
            if target and int(target[1:]) <= row.last_seq:
                rev = s.scalars(
                    select(RevisionRow).where(
                        RevisionRow.resource_pk == row.pk, RevisionRow.seq == int(target[1:])
                    )
                ).first()
            if rev is None:
                name = f"{coll}/{rid}/revisions/{ref}"
                raise NotFound(f"{name} not found", metadata={"resource": name})
            return _revision(rev, _resource(row))

    def list_revisions(
        self, team: str, coll: Collection, rid: str, *, before: int | None, limit: int
    ) -> list[Revision]:
        """Newest first: up to limit + 1 revisions with seq < before."""
        with Session(self.engine) as s:
            row = self._row(s, team, coll, rid)
            parent = _resource(row)
            query = select(RevisionRow).where(RevisionRow.resource_pk == row.pk)
            if before is not None:
                query = query.where(RevisionRow.seq < before)
            rows = s.scalars(query.order_by(RevisionRow.seq.desc()).limit(limit + 1))
            return [_revision(r, parent) for r in rows]

    def _dependants(self, s: Session, model: ResourceRow) -> list[str]:
        """Revisions of the team's other models whose lineage names a revision of `model`."""
        prefix = f"{Collection.MODELS}/{model.resource_id}/"
        rows = s.execute(
            select(ResourceRow.resource_id, RevisionRow.seq, RevisionRow.body)
            .join(RevisionRow, RevisionRow.resource_pk == ResourceRow.pk)
            .where(
                ResourceRow.team == model.team,
                ResourceRow.collection == Collection.MODELS.value,
                ResourceRow.pk != model.pk,
            )
        )
        return [
            f"models/{rid}/revisions/{revision_id(seq)}"
            for rid, seq, body in rows
            if body.get("lineage", {}).get("baseModelRevision", "").startswith(prefix)
        ]


def raise_if_referenced(refs: list[str], name: str) -> None:
    if refs:
        raise FailedPrecondition(
            f"{name} is the base of {len(refs)} revision(s), e.g. {refs[0]}; delete those first",
            metadata={"referenced_by": refs[0]},
        )
