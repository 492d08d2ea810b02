"""The reward service's client: scoring, evaluator validation, the review queue."""

from __future__ import annotations

from services.clients.base import ServiceClient
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

REVIEWS_PAGE_SIZE = 100


class RewardClient(ServiceClient):
    """Async client of the RewardService (ours, or another team's with the same contract)."""

    service = "reward"
    descriptor = rs.DESCRIPTOR
    stub_class = rs_grpc.RewardServiceStub

    async def score(
        self,
        request: rs.ScoreRequest,
        team: str | None = None,
        timeout_s: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> rs.ScoreResponse:
        """Score the request's samples with its evaluator (a name, or an inline spec);
        `metadata` replaces the client's for this call."""
        return await self._call(self.stub.Score, request, team, timeout_s, metadata)

    async def validate_evaluator(
        self, spec_json: str, team: str | None = None
    ) -> rs.ValidateEvaluatorResponse:
        request = rs.ValidateEvaluatorRequest(spec_json=spec_json)
        return await self._call(self.stub.ValidateEvaluator, request, team)

    async def list_scorer_types(self, team: str | None = None) -> rs.ListScorerTypesResponse:
        return await self._call(self.stub.ListScorerTypes, rs.ListScorerTypesRequest(), team)

    async def list_reviews(
        self, state: int = 0, team: str | None = None, page_size: int = REVIEWS_PAGE_SIZE
    ) -> list[rs.Review]:
        """Every review of the team in `state` (0: all), page after page."""
        request = rs.ListReviewsRequest(page_size=page_size, state=state)  # type: ignore[arg-type]
        return await self._every_page(self.stub.ListReviews, request, "reviews", team)

    async def get_review(self, name: str, team: str | None = None) -> rs.Review:
        return await self._call(self.stub.GetReview, rs.GetReviewRequest(name=name), team)

    async def submit_review(
        self, name: str, answer: rs.ReviewAnswer, team: str | None = None
    ) -> rs.Review:
        request = rs.SubmitReviewRequest(name=name, answer=answer)
        return await self._call(self.stub.SubmitReview, request, team)
