"""`tlm reviews list|answer`: the reward service's human review queue from the shell (the
reviews its human scorers ask for). Mounted by main.py as `reviews_app`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from services.cli import errors
from services.cli.errors import HandledGroup, UserError
from services.clients.reward import RewardClient
from services.common import proto_json
from tlm.common.v1 import common_pb2
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs

T = TypeVar("T")
console = Console()
reviews_app = typer.Typer(
    cls=HandledGroup, help="Human reviews the reward service waits on.", no_args_is_help=True
)
AddressOpt = Annotated[str | None, typer.Option(help="Reward service address.")]
STATES = {"pending": rs.Review.STATE_PENDING, "answered": rs.Review.STATE_ANSWERED, "all": 0}
CHOICES = {"A": 0, "B": 1}  # candidate letters, as `reviews list` shows them
PAGE_SIZE = 100


def review_name(review: str) -> str:
    """'abc' or 'reviews/abc' -> 'reviews/abc'."""
    return review if review.startswith("reviews/") else f"reviews/{review}"


def call(address: str | None, fn: Callable[[RewardClient], Awaitable[T]]) -> T:
    """Run `fn` with a reward client; its errors are reported by services/cli/errors.py."""
    return errors.call(RewardClient, address, fn)


def prompt_text(prompt: common_pb2.Prompt) -> str:
    """A prompt as one text: its text, or its chat turns as 'role: content' lines.

    >>> turn = common_pb2.ChatMessage(role="user", content="hi")
    >>> prompt_text(common_pb2.Prompt(messages=common_pb2.Conversation(messages=[turn])))
    'user: hi'
    """
    if prompt.WhichOneof("content") == "messages":
        return "\n".join(f"{m.role}: {m.content}" for m in prompt.messages.messages)
    return prompt.text


def answer_text(review: rs.Review) -> str:
    """'chose B', 'rated 4 of 1..5', or '' while pending (and the comment, if any)."""
    answer = review.answer
    which = answer.WhichOneof("answer")
    if which is None:
        return ""
    if which == "chosen_index":
        text = f"chose {'AB'[answer.chosen_index]}"
    else:
        text = f"rated {answer.rating:g} of {review.rating_min:g}..{review.rating_max:g}"
    by = f" by {answer.reviewer}" if answer.reviewer else ""
    return f"{text}{by}" + (f": {answer.comment}" if answer.comment else "")


@reviews_app.command("list")
def list_reviews(
    state: Annotated[str, typer.Option(help=" | ".join(STATES))] = "pending",
    address: AddressOpt = None,
) -> None:
    """The team's reviews, oldest pending first; answer one with `tlm reviews answer`."""
    if state not in STATES:
        raise UserError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")
    reviews = call(address, lambda c: c.list_reviews(STATES[state], page_size=PAGE_SIZE))
    table = Table(
        Column("review", no_wrap=True),  # the id, whole, to copy into `tlm reviews answer`
        Column("kind", no_wrap=True),
        *(Column(title, overflow="fold") for title in ("prompt", "candidates", "answer")),
        show_lines=True,
    )
    for r in reviews:
        texts = [c.completion for c in r.candidates]
        if r.kind == ev.REVIEW_KIND_PAIRWISE:
            kind = "pairwise"
            texts = [f"{letter}: {text}" for letter, text in zip("AB", texts, strict=False)]
        else:
            kind = f"rating {r.rating_min:g}..{r.rating_max:g}"
        cells = (
            r.name.removeprefix("reviews/"),
            kind,
            prompt_text(r.prompt),
            "\n".join(texts),
            answer_text(r),
        )
        table.add_row(*(Text(cell) for cell in cells))  # literal: prompts and completions
    console.print(table)


@reviews_app.command("answer")
def answer(
    review: Annotated[str, typer.Argument(help="reviews/ID or ID, from `tlm reviews list`.")],
    rating: Annotated[float | None, typer.Option(help="A rating on the review's scale.")] = None,
    choice: Annotated[str | None, typer.Option(help="A or B: the preferred candidate.")] = None,
    comment: Annotated[str, typer.Option(help="Free text kept with the answer.")] = "",
    reviewer: Annotated[str, typer.Option(help="Who answers.")] = "",
    address: AddressOpt = None,
) -> None:
    """Answer a review: --rating for a rating review, --choice for a pairwise one."""
    if (rating is None) == (choice is None):
        raise UserError("give exactly one of --rating (rating reviews) or --choice (pairwise)")
    reply = rs.ReviewAnswer(reviewer=reviewer, comment=comment)
    if choice is not None:
        if choice.upper() not in CHOICES:
            raise UserError(f"--choice: {choice!r} is not A or B")
        reply.chosen_index = CHOICES[choice.upper()]
    else:
        reply.rating = rating  # type: ignore[assignment]
    done = call(address, lambda c: c.submit_review(review_name(review), reply))
    written = f"; written to {done.dataset_revision}" if done.dataset_revision else ""
    state = proto_json.short_name(rs.Review.State, done.state)
    console.print(Text(f"{done.name} {state}: {answer_text(done)}{written}"))
