"""Human-preference scorers and the review queue on real servers: pairwise and rating flows that
end as preference rows in the registry, bad answers, tenancy, pagination and restarts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from services.reward.domain import Prompt
from services.reward.reviews import (
    Answer,
    Candidate,
    Review,
    ReviewState,
    answer_value,
    preference_rows,
)
from tests.reward.conftest import start_reward
from tests.reward.helpers import sample, spec
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

A = (("authorization", "Bearer key-team-a"),)
B = (("authorization", "Bearer key-team-b"),)
PROMPT = "What is 1 + 1?"  # helpers.sample's prompt


def human(kind: str, dataset: str = "", **extra: Any) -> dict[str, Any]:
    cfg = {"kind": kind, "dataset": dataset or f"prefs-{uuid.uuid4().hex[:8]}", **extra}
    return {"name": "people", "human": {"instructions": "Which is more helpful?", **cfg}}


def rated(completion: str, rating: float, low: float, high: float) -> Review:
    return Review(
        completion, "t", ev.REVIEW_KIND_RATING, ReviewState.ANSWERED, Prompt("p"),
        (Candidate(completion, completion, completion),), "", low, high, "d", "s",
        datetime.now(UTC), Answer(rating=rating),
    )  # fmt: skip


def test_ratings_on_different_scales_compare_on_the_unit_range() -> None:
    # 4 on [1, 5] is 0.75; 8 on [0, 10] is 0.8; 0.75 on [0, 1] ties with the first.
    new = rated("a", 4.0, 1.0, 5.0)
    rows = preference_rows(new, [rated("b", 8.0, 0.0, 10.0), rated("c", 0.75, 0.0, 1.0)])
    assert rows == [{"prompt": "p", "chosen": "b", "rejected": "a"}]
    assert answer_value(new, "a") == 0.75


def grouped(sample_id: str, completion: str, group: str = "") -> rs.Sample:
    msg = sample(sample_id, completion)
    msg.group_id = group
    return msg


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


async def read_rows(address: str, revision: str) -> list[dict[str, Any]]:
    registry = RegistryClient(address, api_key="key-team-a")
    try:
        return [row async for row in registry.read_dataset_rows(revision)]
    finally:
        await registry.close()


async def test_pairwise_reviews_become_a_preference_dataset(secured: ServerThread) -> None:
    scorer = human("REVIEW_KIND_PAIRWISE")
    dataset = scorer["human"]["dataset"]
    samples = [
        grouped("a1", "Two.", "g1"),
        grouped("a2", "2", "g1"),
        grouped("b1", "four", "g2"),
        grouped("b2", "1 + 1 = 2", "g2"),
        grouped("lone", "2"),
    ]
    request = rs.ScoreRequest(spec=spec({"scorers": [scorer]}), samples=samples)
    with grpc.insecure_channel(secured.address) as channel:
        stub = rs_grpc.RewardServiceStub(channel)
        first = stub.Score(request, metadata=A, timeout=30).results
        assert [r.status for r in first] == [rs.SCORE_STATUS_PENDING] * 4 + [
            rs.SCORE_STATUS_UNSCORABLE
        ]
        assert "group_id" in first[4].reason
        names = [r.scorers[0].review for r in first[:4]]
        assert names[0] == names[1] != names[2] == names[3] and names[0].startswith("reviews/")
        again = stub.Score(request, metadata=A, timeout=30).results  # no duplicate reviews
        assert [r.scorers[0].review for r in again[:4]] == names

        pending = stub.ListReviews(rs.ListReviewsRequest(state=rs.Review.STATE_PENDING), metadata=A)
        listed = {r.name: r for r in pending.reviews}
        review = listed[names[0]]
        assert review.kind == ev.REVIEW_KIND_PAIRWISE and review.prompt.text == PROMPT
        assert [c.completion for c in review.candidates] == ["Two.", "2"]
        assert review.instructions == "Which is more helpful?" and review.scorer == "people"

        # Another team sees none of it.
        others = stub.ListReviews(rs.ListReviewsRequest(), metadata=B).reviews
        assert not {r.name for r in others} & set(names)
        assert code_of(lambda: stub.GetReview(rs.GetReviewRequest(name=names[0]), metadata=B)) == (
            grpc.StatusCode.NOT_FOUND
        )
        choose_1 = rs.SubmitReviewRequest(
            name=names[0], answer=rs.ReviewAnswer(chosen_index=1, reviewer="ann")
        )
        assert code_of(lambda: stub.SubmitReview(choose_1, metadata=B)) == (
            grpc.StatusCode.NOT_FOUND
        )

        answered = stub.SubmitReview(choose_1, metadata=A)
        assert answered.state == rs.Review.STATE_ANSWERED and answered.answer.reviewer == "ann"
        assert answered.dataset_revision == f"datasets/{dataset}/revisions/r1"
        assert answered.answer_time.seconds >= answered.create_time.seconds > 0
        assert code_of(lambda: stub.SubmitReview(choose_1, metadata=A)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        choose_0 = rs.SubmitReviewRequest(name=names[2], answer=rs.ReviewAnswer(chosen_index=0))
        second = stub.SubmitReview(choose_0, metadata=A)
        assert second.dataset_revision == f"datasets/{dataset}/revisions/r2"

        rescored = stub.Score(request, metadata=A, timeout=30).results
        assert [(r.status, r.reward) for r in rescored[:4]] == [
            (rs.SCORE_STATUS_OK, 0.0),
            (rs.SCORE_STATUS_OK, 1.0),
            (rs.SCORE_STATUS_OK, 1.0),
            (rs.SCORE_STATUS_OK, 0.0),
        ]
        # The same content alone (no partner, another id) finds its answered review.
        alone = rs.ScoreRequest(spec=spec({"scorers": [scorer]}), samples=[grouped("x", "2")])
        assert stub.Score(alone, metadata=A, timeout=30).results[0].reward == 1.0

    rows = await read_rows(secured.address, second.dataset_revision)
    assert rows == [
        {"prompt": PROMPT, "chosen": "2", "rejected": "Two."},
        {"prompt": PROMPT, "chosen": "four", "rejected": "1 + 1 = 2"},
    ]


async def test_rating_reviews_pair_up_by_prompt(secured: ServerThread) -> None:
    scorer = {**human("REVIEW_KIND_RATING", rating_min=0, rating_max=10), "fallback": "short"}
    dataset = scorer["human"]["dataset"]
    evaluator = {
        "scorers": [scorer, {"name": "short", "monitor_only": True, "length": {"max_length": 3}}]
    }
    samples = [grouped("p", "Paris"), grouped("l", "Lyon")]
    request = rs.ScoreRequest(spec=spec(evaluator), samples=samples)
    with grpc.insecure_channel(secured.address) as channel:
        stub = rs_grpc.RewardServiceStub(channel)
        first = stub.Score(request, metadata=A, timeout=30).results
        # Pending: the fallback scores meanwhile (length: 5 and 4 characters, max 3).
        assert [r.scorers[0].status for r in first] == [
            rs.SCORE_STATUS_PENDING,
            rs.SCORE_STATUS_PENDING,
        ]
        assert [r.reward for r in first] == pytest.approx([0.98, 0.99])
        paris, lyon = (r.scorers[0].review for r in first)
        assert paris != lyon

        def rate(name: str, rating: float) -> rs.Review:
            answer = rs.ReviewAnswer(rating=rating)
            return stub.SubmitReview(rs.SubmitReviewRequest(name=name, answer=answer), metadata=A)

        assert code_of(lambda: rate(paris, 11)) == grpc.StatusCode.INVALID_ARGUMENT
        pick = rs.SubmitReviewRequest(name=paris, answer=rs.ReviewAnswer(chosen_index=0))
        assert code_of(lambda: stub.SubmitReview(pick, metadata=A)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert rate(paris, 8).dataset_revision == ""  # one rating of this prompt: no pair yet
        revision = rate(lyon, 3).dataset_revision
        assert revision == f"datasets/{dataset}/revisions/r1"
        rescored = stub.Score(request, metadata=A, timeout=30).results
        assert [(r.scorers[0].status, r.reward) for r in rescored] == [
            (rs.SCORE_STATUS_OK, pytest.approx(0.8)),
            (rs.SCORE_STATUS_OK, pytest.approx(0.3)),
        ]
    rows = await read_rows(secured.address, revision)
    assert rows == [{"prompt": PROMPT, "chosen": "Paris", "rejected": "Lyon"}]


def test_bad_answers_pagination_and_restart(tmp_path: Path) -> None:
    team = (("x-tlm-team", "solo"),)
    rating = spec({"scorers": [human("REVIEW_KIND_RATING")]})
    pairwise = spec({"scorers": [human("REVIEW_KIND_PAIRWISE")]})
    server = start_reward(tmp_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            samples = [grouped(f"s{i}", f"answer {i}") for i in range(3)]
            results = stub.Score(rs.ScoreRequest(spec=rating, samples=samples), metadata=team)
            names = [r.scorers[0].review for r in results.results]
            pair = [grouped("x", "one", "g"), grouped("y", "two", "g")]
            pair_name = (
                stub.Score(rs.ScoreRequest(spec=pairwise, samples=pair), metadata=team)
                .results[0]
                .scorers[0]
                .review
            )

            page1 = stub.ListReviews(rs.ListReviewsRequest(page_size=2), metadata=team)
            page2 = stub.ListReviews(
                rs.ListReviewsRequest(page_size=2, page_token=page1.next_page_token),
                metadata=team,
            )
            assert [r.name for r in [*page1.reviews, *page2.reviews]] == [*names, pair_name]
            assert page2.next_page_token == ""
            other_filter = rs.ListReviewsRequest(
                page_size=2, page_token=page1.next_page_token, state=rs.Review.STATE_PENDING
            )
            assert code_of(lambda: stub.ListReviews(other_filter, metadata=team)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )

            def submit(name: str, **answer: Any) -> rs.Review:
                request = rs.SubmitReviewRequest(name=name, answer=rs.ReviewAnswer(**answer))
                return stub.SubmitReview(request, metadata=team)

            for name, answer in [
                (pair_name, {"rating": 3.0}),
                (pair_name, {"chosen_index": 2}),
                (names[0], {"rating": 0.5}),
                ("nope", {"rating": 3.0}),
            ]:
                assert code_of(lambda: submit(name, **answer)) == (  # noqa: B023
                    grpc.StatusCode.INVALID_ARGUMENT
                )
            assert code_of(lambda: submit("reviews/nope", rating=3.0)) == grpc.StatusCode.NOT_FOUND
            assert submit(names[0], rating=5.0).state == rs.Review.STATE_ANSWERED
            assert code_of(lambda: submit(names[0], rating=4.0)) == (
                grpc.StatusCode.FAILED_PRECONDITION
            )
    finally:
        server.stop()

    server = start_reward(tmp_path)  # the queue survives a restart
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            got = stub.GetReview(rs.GetReviewRequest(name=names[0]), metadata=team)
            assert got.state == rs.Review.STATE_ANSWERED and got.answer.rating == 5.0
            answered = rs.ListReviewsRequest(state=rs.Review.STATE_ANSWERED)
            assert [r.name for r in stub.ListReviews(answered, metadata=team).reviews] == names[:1]
            results = stub.Score(rs.ScoreRequest(spec=rating, samples=samples), metadata=team)
            assert [(r.status, r.reward) for r in results.results] == [
                (rs.SCORE_STATUS_OK, 1.0),
                (rs.SCORE_STATUS_PENDING, 0.0),
                (rs.SCORE_STATUS_PENDING, 0.0),
            ]
    finally:
        server.stop()
