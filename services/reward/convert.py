"""All protobuf <-> domain conversion of the reward service."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import duration_pb2, json_format

from services.common.timestamps import to_timestamp_or_none
from services.reward.domain import Prompt, Sample, SampleResult, ScorerResult, Status
from services.reward.reviews import Answer, Review
from services.specs.evaluator import Validation
from tlm.common.v1 import common_pb2
from tlm.reward.v1 import reward_service_pb2 as rs


def prompt_from_proto(msg: common_pb2.Prompt) -> Prompt:
    if msg.HasField("messages"):
        return Prompt(messages=tuple((m.role, m.content) for m in msg.messages.messages))
    return Prompt(text=msg.text)


def prompt_to_proto(prompt: Prompt) -> common_pb2.Prompt:
    if prompt.messages:
        turns = [common_pb2.ChatMessage(role=r, content=c) for r, c in prompt.messages]
        return common_pb2.Prompt(messages=common_pb2.Conversation(messages=turns))
    return common_pb2.Prompt(text=prompt.text)


def sample_from_proto(msg: rs.Sample) -> Sample:
    return Sample(
        sample_id=msg.sample_id,
        completion=msg.completion,
        prompt=prompt_from_proto(msg.prompt),
        metadata=json_format.MessageToDict(msg.metadata) if msg.HasField("metadata") else {},
        group_id=msg.group_id,
        token_ids=tuple(msg.completion_token_ids),
    )


def sample_to_proto(sample: Sample) -> rs.Sample:
    msg = rs.Sample(
        sample_id=sample.sample_id,
        completion=sample.completion,
        prompt=prompt_to_proto(sample.prompt),
        group_id=sample.group_id,
        completion_token_ids=list(sample.token_ids),
    )
    if sample.metadata:
        msg.metadata.update(dict(sample.metadata))
    return msg


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))  # a third of FromTimedelta's cost, per scorer result
    return d


def scorer_result_to_proto(r: ScorerResult) -> rs.ScorerResult:
    return rs.ScorerResult(
        scorer=r.scorer,
        status=int(r.status),  # type: ignore[arg-type]  # Status mirrors ScoreStatus numbers
        raw_value=r.raw_value,
        value=r.value,
        reason=r.reason,
        cached=r.cached,
        latency=_duration(r.latency_s),
        review=r.review,
    )


def sample_result_to_proto(r: SampleResult) -> rs.SampleResult:
    """`reward` is set only for an OK sample: a missing reward is how the wire says "none"."""
    return rs.SampleResult(
        sample_id=r.sample_id,
        status=int(r.status),  # type: ignore[arg-type]
        reward=r.reward if r.status is Status.OK else None,
        scorers=[scorer_result_to_proto(s) for s in r.scorers],
        gate=r.gate,
        reason=r.reason,
    )


def score_response(results: Sequence[SampleResult], revision: str = "") -> rs.ScoreResponse:
    return rs.ScoreResponse(
        results=[sample_result_to_proto(r) for r in results], evaluator_revision=revision
    )


def validation_to_proto(v: Validation) -> rs.ValidateEvaluatorResponse:
    response = rs.ValidateEvaluatorResponse(
        valid=v.valid,
        errors=[rs.ValidationError(path=e.field, message=e.description) for e in v.errors],
    )
    if v.normalized is not None:
        response.normalized.CopyFrom(v.normalized)
        response.normalized_json = v.normalized_json
    return response


def answer_from_proto(msg: rs.ReviewAnswer) -> Answer:
    which = msg.WhichOneof("answer")
    return Answer(
        rating=msg.rating if which == "rating" else None,
        chosen_index=msg.chosen_index if which == "chosen_index" else None,
        reviewer=msg.reviewer,
        comment=msg.comment,
    )


def answer_to_proto(a: Answer) -> rs.ReviewAnswer:
    msg = rs.ReviewAnswer(reviewer=a.reviewer, comment=a.comment)
    if a.rating is not None:
        msg.rating = a.rating
    if a.chosen_index is not None:
        msg.chosen_index = a.chosen_index
    return msg


def review_to_proto(r: Review) -> rs.Review:
    return rs.Review(
        name=r.name,
        kind=r.kind,  # type: ignore[arg-type]
        state=int(r.state),  # type: ignore[arg-type]  # ReviewState mirrors Review.State
        prompt=prompt_to_proto(r.prompt),
        candidates=[
            rs.Candidate(sample_id=c.sample_id, completion=c.completion) for c in r.candidates
        ],
        instructions=r.instructions,
        rating_min=r.rating_min,
        rating_max=r.rating_max,
        answer=answer_to_proto(r.answer) if r.answer is not None else None,
        scorer=r.scorer,
        create_time=to_timestamp_or_none(r.create_time),
        answer_time=to_timestamp_or_none(r.answer_time),
        dataset_revision=r.dataset_revision,
    )
