"""Human reviews, the domain part: reviews and answers, the keys that find a sample's review
again, answer checks, answer -> value, and answer -> preference rows. Pure; no grpc, no SQL."""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.reward.domain import Prompt, Sample
from tlm.reward.v1 import evaluator_pb2 as ev


class ReviewState(enum.IntEnum):
    """Mirrors tlm.reward.v1.Review.State."""

    PENDING = 1
    ANSWERED = 2


@dataclass(frozen=True)
class Candidate:
    sample_id: str
    completion: str
    key: str  # candidate_key(): finds this completion's review when it is scored again


@dataclass(frozen=True)
class Answer:
    rating: float | None = None
    chosen_index: int | None = None
    reviewer: str = ""
    comment: str = ""


@dataclass(frozen=True)
class Review:
    review_id: str
    team: str
    kind: int  # ev.ReviewKind
    state: ReviewState
    prompt: Prompt
    candidates: tuple[Candidate, ...]
    instructions: str
    rating_min: float
    rating_max: float
    dataset: str
    scorer: str
    create_time: datetime
    answer: Answer | None = None
    answer_time: datetime | None = None
    dataset_revision: str = ""

    @property
    def name(self) -> str:
        return f"reviews/{self.review_id}"


class ReviewNotFound(NotFound):
    pass


class ReviewAlreadyAnswered(FailedPrecondition):
    pass


def review_id_from_name(name: str) -> str:
    if not name.startswith("reviews/") or not name[len("reviews/") :]:
        raise InvalidArgument(
            f"name: expected 'reviews/{{review}}', got {name!r}",
            violations=[FieldViolation("name", "expected 'reviews/{review}'")],
        )
    return name[len("reviews/") :]


def _digest(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def prompt_key(prompt: Prompt) -> str:
    return _digest(prompt.text, json.dumps(prompt.messages))


def candidate_key(cfg: ev.HumanPreferenceScorer, sample: Sample) -> str:
    """Content hash of the question asked about one completion: the review parameters, the
    prompt and the completion (not the sample id, which callers reuse freely)."""
    params = cfg.SerializeToString(deterministic=True).hex()
    return _digest(params, prompt_key(sample.prompt), sample.completion)


def review_key(candidate_keys: Sequence[str]) -> str:
    """One review per question; a pair is the same question in either order."""
    return _digest(*sorted(candidate_keys))


def pairs_by_group(samples: Sequence[Sample]) -> tuple[list[tuple[int, int]], dict[int, str]]:
    """Consecutive pairs of sample indices sharing a group id, and why others have no pair.

    >>> s = [Sample(str(i), "c", group_id=g) for i, g in enumerate(["a", "b", "a", "", "b", "a"])]
    >>> pairs, unpaired = pairs_by_group(s)
    >>> pairs, sorted(unpaired)
    ([(0, 2), (1, 4)], [3, 5])
    """
    groups: dict[str, list[int]] = {}
    unpaired: dict[int, str] = {}
    for i, sample in enumerate(samples):
        if sample.group_id:
            groups.setdefault(sample.group_id, []).append(i)
        else:
            unpaired[i] = "pairwise review needs a group_id shared with another completion"
    pairs: list[tuple[int, int]] = []
    for members in groups.values():
        pairs.extend(zip(members[0::2], members[1::2], strict=False))
        if len(members) % 2:
            unpaired[members[-1]] = "no partner in its group for a pairwise review"
    return sorted(pairs), unpaired


def check_answer(review: Review, answer: Answer) -> None:
    """InvalidArgument unless the answer fits the review's kind and scale."""
    if review.kind == ev.REVIEW_KIND_PAIRWISE:
        if answer.chosen_index not in (0, 1):
            raise _bad("answer.chosen_index", "a pairwise review needs chosen_index 0 or 1")
        return
    if answer.rating is None:
        raise _bad("answer.rating", "a rating review needs a rating")
    if not review.rating_min <= answer.rating <= review.rating_max:
        scale = f"[{review.rating_min:g}, {review.rating_max:g}]"
        raise _bad("answer.rating", f"must be within {scale}, got {answer.rating:g}")


def _bad(field: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {why}", violations=[FieldViolation(field, why)])


def answer_value(review: Review, candidate_key: str) -> float:
    """The reward of one candidate from the answer: a rating mapped linearly to [0, 1]; for a
    pairwise choice 1.0 for the chosen completion and 0.0 for the other.

    >>> r = Review("r", "t", ev.REVIEW_KIND_RATING, ReviewState.ANSWERED, Prompt("p"),
    ...     (Candidate("a", "x", "k"),), "", 1.0, 5.0, "d", "s", datetime.now(), Answer(rating=4.0))
    >>> answer_value(r, "k")
    0.75
    """
    assert review.answer is not None
    if review.kind == ev.REVIEW_KIND_PAIRWISE:
        chosen = review.candidates[review.answer.chosen_index or 0]
        return 1.0 if chosen.key == candidate_key else 0.0
    rating = review.answer.rating or 0.0
    return (rating - review.rating_min) / (review.rating_max - review.rating_min)


def prompt_row(prompt: Prompt) -> str | list[dict[str, str]]:
    if prompt.messages:
        return [{"role": r, "content": c} for r, c in prompt.messages]
    return prompt.text


def preference_rows(review: Review, earlier: Sequence[Review]) -> list[dict[str, Any]]:
    """Preference rows ({prompt, chosen, rejected}) an answer adds to the dataset.

    PAIRWISE: one row. RATING: one row per earlier answered rating of the same prompt with a
    different completion and a different rating (the higher-rated completion is chosen, ratings
    compared after mapping to [0, 1]); a first rating, or a tie, adds none.

    >>> def rated(c, v):
    ...     return Review(c, "t", ev.REVIEW_KIND_RATING, ReviewState.ANSWERED, Prompt("p"),
    ...         (Candidate(c, c, c),), "", 1.0, 5.0, "d", "s", datetime.now(), Answer(rating=v))
    >>> preference_rows(rated("x", 4.0), [rated("y", 2.0), rated("z", 4.0)])
    [{'prompt': 'p', 'chosen': 'x', 'rejected': 'y'}]
    """
    assert review.answer is not None
    prompt = prompt_row(review.prompt)
    if review.kind == ev.REVIEW_KIND_PAIRWISE:
        chosen = review.answer.chosen_index or 0
        return [
            {
                "prompt": prompt,
                "chosen": review.candidates[chosen].completion,
                "rejected": review.candidates[1 - chosen].completion,
            }
        ]
    rows = []
    mine, value = review.candidates[0], answer_value(review, review.candidates[0].key)
    for other in earlier:
        if (
            other.kind == ev.REVIEW_KIND_PAIRWISE
            or other.answer is None
            or other.answer.rating is None
        ):
            continue
        theirs = other.candidates[0]
        # Compared on [0, 1], so ratings given on different scales still order correctly.
        other_value = answer_value(other, theirs.key)
        if theirs.completion == mine.completion or other_value == value:
            continue
        better, worse = (mine, theirs) if value > other_value else (theirs, mine)
        rows.append({"prompt": prompt, "chosen": better.completion, "rejected": worse.completion})
    return rows
