"""The thin gRPC servicer: convert the request, call the core, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common.auth import current_team
from services.common.errors import InvalidArgument
from services.reward import convert
from services.reward.catalog import scorer_types
from services.reward.domain import Sample
from services.reward.review_queue import ReviewQueue
from services.reward.service import RewardCore
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


class RewardServicer(rs_grpc.RewardServiceServicer):
    def __init__(self, core: RewardCore, reviews: ReviewQueue) -> None:
        self.core = core
        self.reviews = reviews

    async def Score(
        self, request: rs.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> rs.ScoreResponse:
        team = current_team()
        inline = request.spec if request.HasField("spec") else None
        spec, revision = await self.core.resolve(request.evaluator, inline, team)
        samples = [convert.sample_from_proto(s) for s in request.samples]
        results = await self.core.score(spec, samples, team, _remaining(context))
        return convert.score_response(results, revision)

    async def StreamScore(
        self,
        request_iterator: AsyncIterator[rs.StreamScoreRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[rs.StreamScoreResponse]:
        team = current_team()
        first = await self.core.stream_opening(anext(aiter(request_iterator), None))
        if first is None or not first.HasField("config"):
            raise InvalidArgument("the first StreamScore message must carry config")
        config = first.config
        inline = config.spec if config.HasField("spec") else None
        spec, _revision = await self.core.resolve(config.evaluator, inline, team)

        async def samples() -> AsyncIterator[Sample]:
            async for message in request_iterator:
                if not message.HasField("sample"):
                    raise InvalidArgument("only the first StreamScore message may carry config")
                yield convert.sample_from_proto(message.sample)

        async for result in self.core.score_stream(spec, samples(), team, _remaining(context)):
            yield rs.StreamScoreResponse(result=convert.sample_result_to_proto(result))

    async def ValidateEvaluator(
        self, request: rs.ValidateEvaluatorRequest, context: grpc.aio.ServicerContext
    ) -> rs.ValidateEvaluatorResponse:
        text = request.spec_json if request.HasField("spec_json") else None
        spec = request.spec if request.HasField("spec") else None
        result = await self.core.validate(text, spec, request.check_references, current_team())
        return convert.validation_to_proto(result)

    async def ListScorerTypes(
        self, request: rs.ListScorerTypesRequest, context: grpc.aio.ServicerContext
    ) -> rs.ListScorerTypesResponse:
        return scorer_types()

    async def ListReviews(
        self, request: rs.ListReviewsRequest, context: grpc.aio.ServicerContext
    ) -> rs.ListReviewsResponse:
        page, token = await self.reviews.list(
            current_team(), request.state, request.page_size, request.page_token
        )
        reviews = [convert.review_to_proto(r) for r in page]
        return rs.ListReviewsResponse(reviews=reviews, next_page_token=token)

    async def GetReview(
        self, request: rs.GetReviewRequest, context: grpc.aio.ServicerContext
    ) -> rs.Review:
        return convert.review_to_proto(await self.reviews.get(current_team(), request.name))

    async def SubmitReview(
        self, request: rs.SubmitReviewRequest, context: grpc.aio.ServicerContext
    ) -> rs.Review:
        answer = convert.answer_from_proto(request.answer)
        review = await self.reviews.submit(current_team(), request.name, answer)
        return convert.review_to_proto(review)
