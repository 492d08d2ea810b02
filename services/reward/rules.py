"""Rule scorers: small pure functions of (scorer config, sample) -> Outcome.

Each has a value function with plain arguments and doctest examples, and an adapter that reads
the spec message. `RULES` is the dispatch table on the ScorerSpec oneof name.
"""

from __future__ import annotations

import functools
import itertools
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema
import re2
import referencing.exceptions
from google.protobuf import json_format
from google.protobuf.message import Message

from services.reward.domain import Outcome, Sample, Status
from services.reward.text import TextNorm, extract, normalize
from services.specs.json_schema import SchemaUnusable, validator
from tlm.reward.v1 import evaluator_pb2 as ev

# Pure value functions --------------------------------------------------------------------------


def exact_match_value(text: str, reference: str, norm: TextNorm = TextNorm()) -> float:
    """1.0 when equal after normalisation.

    >>> exact_match_value(" 42 ", "42"), exact_match_value("Paris", "paris")
    (1.0, 0.0)
    >>> exact_match_value("Paris", "paris", TextNorm(lowercase=True))
    1.0
    """
    return 1.0 if normalize(text, norm) == normalize(reference, norm) else 0.0


def contains_value(text: str, items: Sequence[str], mode: int) -> float:
    """ALL (1), ANY (2) or FRACTION (3) of `items` found in `text`.

    >>> contains_value("a cat and a dog", ["cat", "cow"], ev.MATCH_MODE_ALL)
    0.0
    >>> contains_value("a cat and a dog", ["cat", "cow"], ev.MATCH_MODE_ANY)
    1.0
    >>> contains_value("a cat and a dog", ["cat", "cow", "dog", "eel"], ev.MATCH_MODE_FRACTION)
    0.5
    """
    found = [item in text for item in items]
    if mode == ev.MATCH_MODE_FRACTION:
        return sum(found) / len(found) if found else 0.0
    hit = any(found) if mode == ev.MATCH_MODE_ANY else all(found)
    return 1.0 if hit else 0.0


@functools.lru_cache(maxsize=1024)
def compiled(pattern: str, ignore_case: bool = False) -> Any:
    options = re2.Options()
    options.case_sensitive = not ignore_case
    return re2.compile(pattern, options)


def regex_value(text: str, pattern: str, *, full: bool = False, count: bool = False,
                ignore_case: bool = False) -> float:  # fmt: skip
    """1/0 for a (full) match, or the number of non-overlapping matches.

    >>> regex_value("answer: 12", r"\\d+"), regex_value("answer: 12", r"\\d+", full=True)
    (1.0, 0.0)
    >>> regex_value("a1 b22 c333", r"[0-9]+", count=True)
    3.0
    >>> regex_value("YES", "yes", ignore_case=True)
    1.0
    """
    regex = compiled(pattern, ignore_case)
    if count:
        return float(sum(1 for _ in regex.finditer(text)))
    matched = regex.fullmatch(text) if full else regex.search(text)
    return 1.0 if matched else 0.0


# A schema error quotes the instance; a huge completion must not make a huge reason.
MAX_REASON = 500


def json_value(text: str, schema_json: str = "") -> tuple[float, str]:
    """1.0 for valid JSON conforming to the schema; else 0.0 and why. SchemaUnusable when the
    schema reaches outside itself or has a pattern RE2 refuses (see json_schema).

    >>> json_value('{"a": 1}')
    (1.0, '')
    >>> json_value('{"a": 1', )[0]
    0.0
    >>> json_value('{"a": "x"}', '{"properties": {"a": {"type": "integer"}}}')
    (0.0, "a: 'x' is not of type 'integer'")
    >>> json_value('"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!"', '{"pattern": "^(a+)+$"}')[0]
    0.0
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return 0.0, f"not JSON: {exc.msg}"
    if schema_json:
        error = jsonschema.exceptions.best_match(validator(schema_json).iter_errors(value))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "$"
            return 0.0, clip(f"{where}: {error.message}")
    return 1.0, ""


def clip(reason: str, limit: int = MAX_REASON) -> str:
    """Its start and end (messages quote the value first and say what is wrong last).

    >>> clip("'" + "a" * 50 + "' does not match '^b$'", 30)
    "'aaaaaaaaaaa ...  match '^b$'"
    """
    if len(reason) <= limit:
        return reason
    half = (limit - 5) // 2
    return f"{reason[:half]} ... {reason[-half:]}"


def length_value(n: int, low: int, high: int, penalty: float, floor: float) -> float:
    """1.0 inside [low, high], minus `penalty` per unit outside, floored.

    >>> length_value(50, 10, 100, 0.01, 0.0), length_value(120, 10, 100, 0.01, 0.0)
    (1.0, 0.8)
    >>> length_value(0, 10, 100, 0.5, -1.0)
    -1.0
    """
    distance = max(low - n, 0, n - high)
    return max(floor, round(1.0 - penalty * distance, 12))


def format_value(text: str, tags: Sequence[str], surrounding: bool, partial: bool) -> float:
    """Tags each exactly once, in order, as <tag>...</tag>.

    Partial credit is the share of well-formed tags, halved when order or surrounding text is
    wrong.

    >>> format_value("<think>x</think>\\n<answer>4</answer>", ["think", "answer"], False, False)
    1.0
    >>> format_value("hi <think>x</think><answer>4</answer>", ["think", "answer"], False, False)
    0.0
    >>> format_value("hi <think>x</think><answer>4</answer>", ["think", "answer"], True, False)
    1.0
    >>> format_value("<answer>4</answer><think>x</think>", ["think", "answer"], False, True)
    0.5
    >>> format_value("<think>x</think> <answer>4", ["think", "answer"], False, True)
    0.25
    """
    spans = [_tag_span(text, tag) for tag in tags]
    good = [s for s in spans if s is not None]
    structured = (
        len(good) == len(tags)
        and _in_order(good)
        and (surrounding or _only_space_outside(text, good))
    )
    if structured:
        return 1.0
    if not partial:
        return 0.0
    return 0.5 * len(good) / len(tags)


def _tag_span(text: str, tag: str) -> tuple[int, int] | None:
    open_, close = f"<{tag}>", f"</{tag}>"
    if text.count(open_) != 1 or text.count(close) != 1:
        return None
    start, end = text.index(open_), text.index(close)
    return (start, end + len(close)) if start < end else None


def _in_order(spans: Sequence[tuple[int, int]]) -> bool:
    return all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def _only_space_outside(text: str, spans: Sequence[tuple[int, int]]) -> bool:
    cuts = [0, *[p for s in spans for p in s], len(text)]
    return all(not text[cuts[i] : cuts[i + 1]].strip() for i in range(0, len(cuts), 2))


@functools.lru_cache(maxsize=4096)
def parsed_reference(reference: str, limit: int | None) -> tuple[Any, ...]:
    """math-verify's parse of a reference, kept per process: a group's G samples share their
    prompt's reference, and its parse was about 40% of a sample's scoring (0.46 of 1.2 ms).
    The parsed values are immutable sympy objects and strings; a parse that raised (a timeout)
    is not kept."""
    from math_verify import parse

    return tuple(parse(reference, parsing_timeout=limit, raise_on_error=True))  # type: ignore[arg-type]


def math_value(answer: str, reference: str) -> float | None:
    """1.0 when math-verify finds them equivalent, 0.0 if not, None when no answer parses.

    >>> math_value("The answer is $\\\\frac{1}{2}$", "0.5")
    1.0
    >>> math_value("$x = 3$", "4")
    0.0
    """
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which only works in a process's main thread;
    # elsewhere the caller's deadline is the only guard.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    # raise_on_error: a timeout must not read as "no answer" or "not equal" (a cached 0.0).
    gold = list(parsed_reference(str(reference), limit))
    pred = parse(answer, parsing_timeout=limit, raise_on_error=True)  # type: ignore[arg-type]
    if not pred:
        return None
    return 1.0 if verify(gold, pred, timeout_seconds=limit, raise_on_error=True) else 0.0


# Adapters from spec messages -----------------------------------------------------------------


def text_norm(msg: ev.TextNormalization) -> TextNorm:
    return TextNorm(
        strip=msg.strip if msg.HasField("strip") else True,
        lowercase=msg.lowercase,
        collapse_whitespace=msg.collapse_whitespace
        if msg.HasField("collapse_whitespace")
        else True,
        remove_punctuation=msg.remove_punctuation,
    )


def _extracted(sample: Sample, extraction: ev.Extraction) -> str | None:
    return extract(sample.completion, extraction.tag, extraction.code_block)


def _missing_part(extraction: ev.Extraction) -> Outcome:
    what = f"<{extraction.tag}> tag" if extraction.tag else "fenced code block"
    return Outcome.unscorable(f"the completion has no {what}")


def _reference(sample: Sample, field: str) -> Any:
    return sample.metadata.get(field or "reference")


def _reference_and_text(
    sample: Sample, field: str, extraction: ev.Extraction
) -> tuple[Any, str] | Outcome:
    """The row's reference and the completion's extracted part, or why the sample is
    unscorable (no reference, or no answer tag / code block)."""
    reference = _reference(sample, field)
    if reference is None:
        return Outcome.unscorable(f"metadata has no {field or 'reference'!r}")
    text = _extracted(sample, extraction)
    if text is None:
        return _missing_part(extraction)
    return reference, text


def score_exact_match(cfg: ev.ExactMatchScorer, sample: Sample) -> Outcome:
    found = _reference_and_text(sample, cfg.reference_field, cfg.extraction)
    if isinstance(found, Outcome):
        return found
    reference, text = found
    return Outcome.ok(exact_match_value(text, str(reference), text_norm(cfg.normalization)))


def score_contains(cfg: ev.ContainsScorer, sample: Sample) -> Outcome:
    items: list[str] = list(cfg.substrings)
    if not items:
        reference = _reference(sample, cfg.reference_field)
        if reference is None:
            return Outcome.unscorable(f"metadata has no {cfg.reference_field or 'reference'!r}")
        items = [str(r) for r in reference] if isinstance(reference, list) else [str(reference)]
    text = _extracted(sample, cfg.extraction)
    if text is None:
        return _missing_part(cfg.extraction)
    norm = text_norm(cfg.normalization)
    needles = [normalize(i, norm) for i in items]
    return Outcome.ok(contains_value(normalize(text, norm), needles, cfg.mode or ev.MATCH_MODE_ALL))


def score_regex(cfg: ev.RegexScorer, sample: Sample) -> Outcome:
    text = _extracted(sample, cfg.extraction)
    if text is None:
        return _missing_part(cfg.extraction)
    value = regex_value(
        text, cfg.pattern, full=cfg.full_match, count=cfg.count, ignore_case=cfg.ignore_case
    )
    return Outcome.ok(value)


def score_json(cfg: ev.JsonScorer, sample: Sample) -> Outcome:
    text = _extracted(sample, cfg.extraction)
    if text is None:
        return _missing_part(cfg.extraction)
    schema = ""
    if cfg.HasField("schema"):
        schema = json.dumps(json_format.MessageToDict(cfg.schema), sort_keys=True)
    try:
        value, why = json_value(text, schema)
    except (SchemaUnusable, referencing.exceptions.Unresolvable) as exc:
        # A spec problem, the same for every sample: ERROR (not cached), and the reason is ours,
        # never content of whatever the reference points at.
        return Outcome.error(_unusable_reason(exc))
    return Outcome(Status.OK, value, why)


def _unusable_reason(exc: Exception) -> str:
    if isinstance(exc, SchemaUnusable):
        return clip(f"schema not usable: {exc}")
    ref = getattr(exc, "ref", "")
    return clip(f"schema not usable: reference {ref!r} does not resolve inside the schema")


def score_length(cfg: ev.LengthScorer, sample: Sample) -> Outcome:
    text = sample.completion
    if cfg.unit == ev.LENGTH_UNIT_TOKENS and sample.token_ids:
        n = len(sample.token_ids)
    elif cfg.unit in (ev.LENGTH_UNIT_WORDS, ev.LENGTH_UNIT_TOKENS):
        n = len(text.split())
    else:
        n = len(text)
    penalty = cfg.penalty_per_unit if cfg.HasField("penalty_per_unit") else 0.01
    return Outcome.ok(length_value(n, cfg.min_length, cfg.max_length, penalty, cfg.floor_value))


def score_format(cfg: ev.FormatScorer, sample: Sample) -> Outcome:
    value = format_value(
        sample.completion, list(cfg.tags), cfg.allow_surrounding_text, cfg.partial_credit
    )
    return Outcome.ok(value)


def score_math(cfg: ev.MathScorer, sample: Sample) -> Outcome:
    found = _reference_and_text(sample, cfg.reference_field, cfg.extraction)
    if isinstance(found, Outcome):
        return found
    reference, text = found
    from math_verify.errors import TimeoutException

    try:
        value = math_value(text, str(reference))
    except TimeoutException:
        return Outcome.timeout("math-verify timed out")
    except Exception as exc:
        return Outcome.error(f"math-verify failed: {type(exc).__name__}: {exc}"[:300])
    if value is None:
        return Outcome.unscorable("no mathematical answer found in the completion")
    return Outcome.ok(value)


RuleFn = Callable[[Message, Sample], Outcome]
RULES: dict[str, RuleFn] = {
    "exact_match": score_exact_match,  # type: ignore[dict-item]
    "contains": score_contains,  # type: ignore[dict-item]
    "regex": score_regex,  # type: ignore[dict-item]
    "json": score_json,  # type: ignore[dict-item]
    "length": score_length,  # type: ignore[dict-item]
    "format": score_format,  # type: ignore[dict-item]
    "math": score_math,  # type: ignore[dict-item]
}


def score_rule(scorer: ev.ScorerSpec, sample: Sample) -> Outcome:
    """Run one rule scorer; an exception inside it is an ERROR outcome, never a zero."""
    kind = scorer.WhichOneof("scorer") or ""
    try:
        return RULES[kind](getattr(scorer, kind), sample)
    except Exception as exc:  # a scorer bug or odd input must not fail the whole batch
        return Outcome.error(f"{kind} scorer failed: {type(exc).__name__}: {exc}")
