"""The judge scorer: a rubric prompt sent to a model served by the rollout service (Generate,
greedy by default), the score parsed with an RE2 pattern and mapped to [0, 1]."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import re2

from services.clients.rollout import RolloutClient
from services.common.client import call_metadata
from services.common.errors import TlmError
from services.reward.domain import Outcome, Sample
from services.reward.engine import ScoreContext, scorer_timeout
from tlm.common.v1 import common_pb2
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.rollout.v1 import rollout_pb2

# Prompts per Generate call.
CHUNK = 64
PLACEHOLDER = re.compile(r"\{(prompt|completion|reference)\}")


def fill_rubric(rubric: str, sample: Sample) -> str:
    """The rubric with {prompt}, {completion} and {reference} replaced (other braces are kept,
    so rubrics may show JSON).

    >>> s = Sample("a", "4", metadata={"reference": 4})
    >>> fill_rubric('Q: {prompt} A: {completion} Ref: {reference} {"score": N}', s)
    'Q:  A: 4 Ref: 4 {"score": N}'
    >>> injected = Sample("b", "{reference}", metadata={"reference": 4})
    >>> fill_rubric("A: {completion} Ref: {reference}", injected)
    'A: {reference} Ref: 4'
    """
    reference = sample.metadata.get("reference", "")
    values = {
        "prompt": sample.prompt.as_text(),
        "completion": sample.completion,
        "reference": "" if reference is None else str(reference),
    }
    # One pass: a completion containing "{reference}" stays literal text.
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], rubric)


def parse_score(text: str, pattern: str, low: float, high: float) -> Outcome:
    """The first group of the first match of `pattern`, mapped from [low, high] to [0, 1].

    >>> parse_score("Reasoning... Score: 7", r"(?i)score\\s*[:=]\\s*(-?[0-9.]+)", 0, 10)
    Outcome(status=<Status.OK: 1>, raw=0.7, reason='', review='')
    >>> parse_score("Score: 12", r"Score: (\\d+)", 0, 10).reason
    'judge score 12 is outside [0, 10]'
    >>> parse_score("no idea", r"Score: (\\d+)", 0, 10).status.name
    'UNSCORABLE'
    """
    match = re2.search(pattern, text)
    if match is None or match.group(1) is None:
        return Outcome.unscorable(f"judge answer has no score matching {pattern!r}: {text[:80]!r}")
    found = match.group(1)
    try:
        score = float(found)
    except ValueError:
        return Outcome.unscorable(f"judge score {found[:40]!r} is not a number")
    if not math.isfinite(score) or not low <= score <= high:
        return Outcome.unscorable(f"judge score {found} is outside [{low:g}, {high:g}]")
    return Outcome.ok((score - low) / (high - low))


def judge_request(cfg: ev.JudgeScorer, samples: Sequence[Sample]) -> rollout_pb2.GenerateRequest:
    """One chat turn per sample (the judge is served as a chat model), greedy by default."""
    prompts = [
        common_pb2.Prompt(
            messages=common_pb2.Conversation(
                messages=[common_pb2.ChatMessage(role="user", content=fill_rubric(cfg.rubric, s))]
            )
        )
        for s in samples
    ]
    sampling = rollout_pb2.SamplingParams(
        n=1, temperature=cfg.temperature, max_tokens=cfg.max_tokens, skip_logprobs=True
    )
    return rollout_pb2.GenerateRequest(
        prompts=prompts,
        sampling=sampling,
        adapter_revision=cfg.adapter_revision,
        model_revision=cfg.model_revision,
    )


class JudgeScorerAdapter:
    """`default_address` (the configured rollout address, else the server's own) is set at
    start, as the registry address is. The service key (it acts for any team) goes only to
    that address or to one the operator listed in `allowed_addresses`."""

    def __init__(
        self,
        service_api_key: str | None,
        default_address: str = "",
        allowed_addresses: Sequence[str] = (),
    ) -> None:
        self.default_address = default_address
        self.allowed_addresses = set(allowed_addresses)
        self._service_key = service_api_key
        self._clients: dict[str, RolloutClient] = {}

    def problem(self, cfg: ev.JudgeScorer) -> str | None:
        """Why this deployment refuses the scorer's rollout address, or None."""
        address = cfg.rollout_address
        if not address or address == self.default_address or address in self.allowed_addresses:
            return None
        return "not the configured rollout address (TLM_REWARD_JUDGE_ROLLOUT_ADDRESSES)"

    def _client(self, address: str) -> RolloutClient:
        if address not in self._clients:
            self._clients[address] = RolloutClient(address)  # TLS when TLM_TLS_CA_FILE is set
        return self._clients[address]

    async def score(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[Outcome]:
        cfg = scorer.judge
        refused = self.problem(cfg)
        if refused:
            return [Outcome.error(f"rollout_address: {refused}")] * len(samples)
        address = cfg.rollout_address or self.default_address
        texts: list[str] = []
        for start in range(0, len(samples), CHUNK):
            chunk = samples[start : start + CHUNK]
            try:
                texts.extend(await self._generate(address, cfg, chunk, scorer, ctx))
            except TlmError as exc:
                if exc.remote is None:
                    raise
                why = f"rollout {address} failed: {exc.remote.code.name}: {exc.remote.message}"
                return [Outcome.error(why)] * len(samples)
        low, high = cfg.score_min, cfg.score_max
        return [parse_score(text, cfg.score_pattern, low, high) for text in texts]

    async def _generate(
        self,
        address: str,
        cfg: ev.JudgeScorer,
        samples: Sequence[Sample],
        scorer: ev.ScorerSpec,
        ctx: ScoreContext,
    ) -> list[str]:
        request = judge_request(cfg, samples)
        budget = min(scorer_timeout(scorer), ctx.remaining() - 0.1)
        texts = [""] * len(samples)
        stream = self._client(address).generate(
            request,
            timeout_s=max(budget, 0.01),
            metadata=call_metadata(self._service_key, ctx.team),
        )
        async for response in stream:
            for completion in response.completions:
                texts[completion.prompt_index] = completion.text
        return texts

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
