"""The review queue's use cases: samples routed to a human scorer become pending reviews (one
per sample for RATING, one per pair of a group for PAIRWISE); answered reviews give the value
when the same content is scored again; answers become preference rows in the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import structlog

from services.common.errors import FailedPrecondition
from services.common.pagination import decode_token, encode_token, page_size
from services.reward.domain import Outcome, Sample, Status
from services.reward.engine import ScoreContext
from services.reward.registry_port import RegistryPort
from services.reward.review_store import ReviewStore, TeamLock
from services.reward.reviews import (
    Answer,
    Candidate,
    Review,
    ReviewAlreadyAnswered,
    ReviewState,
    answer_value,
    candidate_key,
    check_answer,
    pairs_by_group,
    preference_rows,
    prompt_key,
    review_id_from_name,
    review_key,
)
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward")


class ReviewQueue:
    """Also the `human` scorer adapter. `registry` is set once the server knows its address."""

    def __init__(self, store: ReviewStore) -> None:
        self.store = store
        self.registry: RegistryPort | None = None
        self._submit_lock = asyncio.Lock()

    # Scoring ------------------------------------------------------------------------------

    async def score(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[Outcome]:
        return await asyncio.to_thread(self._route, scorer, samples, ctx.team)

    def _route(self, scorer: ev.ScorerSpec, samples: Sequence[Sample], team: str) -> list[Outcome]:
        cfg = scorer.human
        keys = [candidate_key(cfg, s) for s in samples]
        outcomes: dict[int, Outcome] = {}
        if cfg.kind == ev.REVIEW_KIND_PAIRWISE:
            for i, key in enumerate(keys):
                done = self.store.answered_with(team, key)
                if done is not None:
                    outcomes[i] = _answered(done, key)
            todo = [i for i in range(len(samples)) if i not in outcomes]
            pairs, unpaired = pairs_by_group([samples[i] for i in todo])
            for j, why in unpaired.items():
                outcomes[todo[j]] = Outcome.unscorable(why)
            for a, b in pairs:
                ia, ib = todo[a], todo[b]
                review = self._review(
                    scorer, team, [samples[ia], samples[ib]], [keys[ia], keys[ib]]
                )
                outcomes[ia], outcomes[ib] = _outcome(review, keys[ia]), _outcome(review, keys[ib])
        else:
            for i, (sample, key) in enumerate(zip(samples, keys, strict=True)):
                outcomes[i] = _outcome(self._review(scorer, team, [sample], [key]), key)
        return [outcomes[i] for i in range(len(samples))]

    def _review(
        self, scorer: ev.ScorerSpec, team: str, samples: Sequence[Sample], keys: Sequence[str]
    ) -> Review:
        cfg = scorer.human
        draft = Review(
            review_id="",
            team=team,
            kind=cfg.kind or ev.REVIEW_KIND_RATING,
            state=ReviewState.PENDING,
            prompt=samples[0].prompt,
            candidates=tuple(
                Candidate(s.sample_id, s.completion, k) for s, k in zip(samples, keys, strict=True)
            ),
            instructions=cfg.instructions,
            rating_min=cfg.rating_min,
            rating_max=cfg.rating_max,
            dataset=cfg.dataset,
            scorer=scorer.name,
            create_time=datetime.now(UTC),
        )
        return self.store.find_or_create(draft, review_key(keys), prompt_key(samples[0].prompt))

    # Reviews API --------------------------------------------------------------------------

    async def get(self, team: str, name: str) -> Review:
        return await asyncio.to_thread(self.store.get, team, review_id_from_name(name))

    async def list(self, team: str, state: int, size: int, token: str) -> tuple[list[Review], str]:
        query = {"team": team, "state": state}
        limit = page_size(size)
        offset = decode_token(token, query) or 0
        page = await asyncio.to_thread(self.store.page, team, state, offset, limit + 1)
        more = len(page) > limit
        return page[:limit], encode_token(offset + limit, query) if more else ""

    async def submit(self, team: str, name: str, answer: Answer) -> Review:
        """Check the answer, append its preference rows to the registry, record it. Submits are
        serialised (they come at human pace) so the rows written match the answer recorded."""
        review_id = review_id_from_name(name)
        async with self._submit_lock:
            lock = await _acquire(self.store, team)  # replicas sharing the queue take turns
            try:
                return await self._submit(team, name, review_id, answer)
            finally:
                await asyncio.to_thread(lock.release)

    async def _submit(self, team: str, name: str, review_id: str, answer: Answer) -> Review:
        review = await asyncio.to_thread(self.store.get, team, review_id)
        if review.state == ReviewState.ANSWERED:
            raise ReviewAlreadyAnswered(f"{name} is already answered")
        check_answer(review, answer)
        answered = replace(review, answer=answer, state=ReviewState.ANSWERED)
        earlier: list[Review] = []
        if review.kind != ev.REVIEW_KIND_PAIRWISE:
            earlier = await asyncio.to_thread(
                self.store.answered_ratings, team, review.dataset, prompt_key(review.prompt)
            )
        rows = preference_rows(answered, earlier)
        revision = ""
        if rows:
            if self.registry is None:
                raise FailedPrecondition("no registry configured for the reward service")
            # The review id as request_id: a retried submit does not append twice.
            revision = await self.registry.append_preferences(
                review.dataset, rows, request_id=review_id, team=team
            )
        now = datetime.now(UTC)
        ok = await asyncio.to_thread(
            self.store.mark_answered, team, review_id, answer, revision, now
        )
        if not ok:
            raise ReviewAlreadyAnswered(f"{name} is already answered")
        log.info("review_answered", review=name, team=team, rows=len(rows), revision=revision)
        return await asyncio.to_thread(self.store.get, team, review_id)


async def _acquire(store: ReviewStore, team: str) -> TeamLock:
    """The team's submit lock; released even if the caller is cancelled while waiting."""
    waiting = asyncio.ensure_future(asyncio.to_thread(store.lock_team, team))
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        waiting.add_done_callback(
            lambda f: f.result().release() if not f.cancelled() and not f.exception() else None
        )
        raise


def _answered(review: Review, key: str) -> Outcome:
    return Outcome(Status.OK, answer_value(review, key), review=review.name)


def _outcome(review: Review, key: str) -> Outcome:
    if review.state == ReviewState.ANSWERED:
        return _answered(review, key)
    return Outcome(Status.PENDING, 0.0, f"waiting for human review {review.name}", review.name)
