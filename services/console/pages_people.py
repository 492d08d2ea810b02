"""The review queue (the human-preference scorer's pending items, answered in the page: how
preference data is collected) and the deployments' status."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common import proto_json
from services.common.errors import FieldViolation, InvalidArgument
from services.console.app import Console, form_of
from tlm.deploy.v1 import deploy_pb2 as dpb
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs


def prompt_text(review: rs.Review) -> str:
    """The prompt as text: raw, or the chat turns one per line."""
    if review.prompt.WhichOneof("content") == "messages":
        return "\n".join(f"{m.role}: {m.content}" for m in review.prompt.messages.messages)
    return review.prompt.text


def _answer(review_kind: int, form: dict[str, str]) -> rs.ReviewAnswer:
    """The answer the page sent: `chosen_index` for pairwise reviews, `rating` otherwise."""
    answer = rs.ReviewAnswer(reviewer=form.get("reviewer", ""), comment=form.get("comment", ""))
    field = "chosen_index" if review_kind == ev.REVIEW_KIND_PAIRWISE else "rating"
    raw = form.get(field, "")
    try:
        if field == "chosen_index":
            answer.chosen_index = int(raw)
        else:
            answer.rating = float(raw)
    except ValueError:
        bad = FieldViolation(f"answer.{field}", "choose or enter a number")
        raise InvalidArgument(
            f"answer.{field}: choose or enter a number", violations=[bad]
        ) from None
    return answer


def routes(console: Console) -> list[Route]:
    async def reviews(request: Request) -> Response:
        pending = await console.clients(request).reward.list_reviews(rs.Review.STATE_PENDING)
        return console.render(
            request, "reviews.html", reviews=pending, prompt_text=prompt_text, pairwise=_pairwise
        )

    async def answer(request: Request) -> Response:
        name = f"reviews/{request.path_params['review']}"
        form = await form_of(request)
        clients = console.clients(request)
        review = await clients.reward.get_review(name)
        try:
            done = await clients.reward.submit_review(name, _answer(review.kind, form))
        except InvalidArgument as exc:
            return console.render(
                request,
                "_review.html",
                review=review,
                error=exc.message,
                prompt_text=prompt_text,
                pairwise=_pairwise,
            )
        return console.render(
            request,
            "_review.html",
            review=done,
            error="",
            prompt_text=prompt_text,
            pairwise=_pairwise,
        )

    async def deployments(request: Request) -> Response:
        found = await console.clients(request).deploy.list_deployments()
        return console.render(
            request,
            "deployments.html",
            deployments=found,
            state=lambda d: proto_json.short_name(dpb.Deployment.State, d.state),
        )

    return [
        Route("/reviews", reviews),
        Route("/reviews/{review}/answer", answer, methods=["POST"]),
        Route("/deployments", deployments),
    ]


def _pairwise(review: rs.Review) -> bool:
    return review.kind == ev.REVIEW_KIND_PAIRWISE
