"""The thin gRPC servicer: convert the request, call the core, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common.auth import current_team
from services.common.errors import InvalidArgument
from services.reward import convert
from services.reward.catalog import scorer_types
from services.reward.domain import Sample
from services.reward.service import RewardCore
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


class RewardServicer(rs_grpc.RewardServiceServicer):
    """ListReviews, GetReview and SubmitReview answer UNIMPLEMENTED (base class) for now."""

    def __init__(self, core: RewardCore) -> None:
        self.core = core

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
        first = await anext(aiter(request_iterator), None)
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
