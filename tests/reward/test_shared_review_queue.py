"""Two reward replicas on one PostgreSQL database (TLM_REWARD_DATABASE_URL) serve one review
queue: a review created through one is listed and answered through the other, and answers to
one review sent to both at once are recorded once, with the rows of the answer recorded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, text

from services.devtools.server_thread import ServerThread
from services.registry.app import binding as registry_binding
from services.registry.settings import RegistrySettings
from services.reward.review_store import ReviewStore
from tests.conftest import API_KEYS
from tests.registry.conftest import fresh_postgres_database, postgres_url
from tests.reward.conftest import start_reward
from tests.reward.helpers import sample, spec
from tests.reward.test_reviews import read_rows
from tests.waiting import wait_for
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

A = (("authorization", "Bearer key-team-a"),)
PROMPT = "What is 1 + 1?"  # helpers.sample's prompt


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(registry address, replica 1, replica 2): the replicas share only the database."""
    url = fresh_postgres_database(postgres_url() or "")
    registry_settings = RegistrySettings(
        host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("registry"), api_keys=API_KEYS
    )
    registry = ServerThread(
        lambda: [registry_binding(registry_settings)], registry_settings
    ).start()
    servers = [
        start_reward(
            tmp_path_factory.mktemp(f"reward-{i}"),
            insecure_dev=False,
            api_keys=API_KEYS,
            service_api_key="key-service",
            registry_address=registry.address,
            database_url=url,
        )
        for i in range(2)
    ]
    yield registry.address, servers[0].address, servers[1].address
    for server in [*servers, registry]:
        server.stop()


def pairwise(dataset: str) -> rs.ScoreRequest:
    kind = ev.ReviewKind.Name(ev.REVIEW_KIND_PAIRWISE)
    human = {"kind": kind, "dataset": dataset, "instructions": "Which is better?"}
    samples = [sample("a1", "Two."), sample("a2", "2")]
    for s in samples:
        s.group_id = "g"
    return rs.ScoreRequest(
        spec=spec({"scorers": [{"name": "people", "human": human}]}), samples=samples
    )


def stub(address: str) -> tuple[grpc.Channel, rs_grpc.RewardServiceStub]:
    channel = grpc.insecure_channel(address)
    return channel, rs_grpc.RewardServiceStub(channel)


def test_a_review_made_on_one_replica_is_answered_on_the_other(
    replicas: tuple[str, str, str],
) -> None:
    registry, first, second = replicas
    dataset = f"prefs-{uuid.uuid4().hex[:8]}"
    (c1, one), (c2, two) = stub(first), stub(second)
    with c1, c2:
        pending = one.Score(pairwise(dataset), metadata=A, timeout=30).results
        assert [r.status for r in pending] == [rs.SCORE_STATUS_PENDING] * 2
        name = pending[0].scorers[0].review
        listed = two.ListReviews(
            rs.ListReviewsRequest(state=rs.Review.STATE_PENDING), metadata=A
        ).reviews
        assert name in {r.name for r in listed}
        answer = rs.ReviewAnswer(chosen_index=1, reviewer="ann")
        answered = two.SubmitReview(rs.SubmitReviewRequest(name=name, answer=answer), metadata=A)
        assert answered.dataset_revision == f"datasets/{dataset}/revisions/r1"
        got = one.GetReview(rs.GetReviewRequest(name=name), metadata=A)
        assert got.state == rs.Review.STATE_ANSWERED and got.answer.reviewer == "ann"
        rescored = one.Score(pairwise(dataset), metadata=A, timeout=30).results
        assert [(r.status, r.reward) for r in rescored] == [
            (rs.SCORE_STATUS_OK, 0.0),
            (rs.SCORE_STATUS_OK, 1.0),
        ]
    rows = asyncio.run(read_rows(registry, answered.dataset_revision))
    assert rows == [{"prompt": PROMPT, "chosen": "2", "rejected": "Two."}]


def test_answers_sent_to_both_replicas_at_once_are_recorded_once(
    replicas: tuple[str, str, str],
) -> None:
    registry, first, second = replicas
    dataset = f"prefs-{uuid.uuid4().hex[:8]}"
    (c1, one), (c2, two) = stub(first), stub(second)
    with c1, c2:
        name = one.Score(pairwise(dataset), metadata=A, timeout=30).results[0].scorers[0].review

        def submit(args: tuple[Any, int]) -> tuple[str, int]:
            replica, choice = args
            request = rs.SubmitReviewRequest(name=name, answer=rs.ReviewAnswer(chosen_index=choice))
            try:
                return "ok", replica.SubmitReview(
                    request, metadata=A, timeout=30
                ).answer.chosen_index
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
                return "refused", choice

        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(submit, [(one, 0), (two, 1)]))
        assert sorted(o for o, _ in outcomes) == ["ok", "refused"]
        winner = next(choice for o, choice in outcomes if o == "ok")
        final = two.GetReview(rs.GetReviewRequest(name=name), metadata=A)
        assert final.answer.chosen_index == winner
    chosen, rejected = ("Two.", "2") if winner == 0 else ("2", "Two.")
    rows = asyncio.run(read_rows(registry, final.dataset_revision))
    assert rows == [{"prompt": PROMPT, "chosen": chosen, "rejected": rejected}]


def test_without_a_database_url_each_replica_keeps_its_own_queue(tmp_path: Path) -> None:
    # The default (SQLite under each data_dir) is one replica's: documented, and shown here.
    servers = [start_reward(tmp_path / f"r{i}") for i in range(2)]
    team = (("x-tlm-team", "solo"),)
    try:
        (c1, one), (c2, two) = stub(servers[0].address), stub(servers[1].address)
        with c1, c2:
            one.Score(pairwise("prefs"), metadata=team, timeout=30)
            assert one.ListReviews(rs.ListReviewsRequest(), metadata=team).reviews
            assert not two.ListReviews(rs.ListReviewsRequest(), metadata=team).reviews
    finally:
        for server in servers:
            server.stop()


def test_replicas_take_turns_recording_one_teams_answers() -> None:
    # What keeps the rows and the recorded answer together across replicas: while one holds a
    # team's submit lock, another replica waits for it; another team does not.
    url = fresh_postgres_database(postgres_url() or "")
    first, second = ReviewStore(url), ReviewStore(url)
    probe = create_engine(url)

    def waiting() -> int:
        with probe.connect() as conn:
            query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            return int(conn.execute(text(query)).scalar_one())

    held = first.lock_team("team-a")
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(second.lock_team, "team-a")
        wait_for(lambda: waiting() == 1, what="the second replica waits for the lock")
        assert not queued.done()
        second.lock_team("team-b").release()  # another team's lock is free meanwhile
        held.release()
        queued.result(timeout=20).release()
    assert waiting() == 0
    probe.dispose()
    first.close()
    second.close()
