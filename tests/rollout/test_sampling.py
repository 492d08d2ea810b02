"""Sampling math with values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidArgument
from services.rollout.domain import SamplingSpec, check_prompt_lengths
from services.rollout.sampling import (
    derive_seed,
    filtered_probs,
    find_stop,
    inverse_cdf,
    next_tokens,
)


def _logits(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])  # (1, V)


def _pick(logits: torch.Tensor, u: float, temperature=1.0, top_k=0, top_p=1.0) -> int:
    return int(
        next_tokens(
            logits,
            torch.tensor([temperature]),
            torch.tensor([top_k]),
            torch.tensor([top_p]),
            torch.tensor([u]),
        )[0]
    )


def test_inverse_cdf_walks_the_cumulative_mass() -> None:
    # probs [0.5, 0.3, 0.2] -> cdf [0.5, 0.8, 1.0]: u < 0.5 -> 0, 0.5 <= u < 0.8 -> 1, else 2.
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 4)
    got = inverse_cdf(probs, torch.tensor([0.0, 0.49, 0.6, 0.95]))
    assert got.tolist() == [0, 0, 1, 2]


def test_zero_probability_tokens_are_never_drawn() -> None:
    probs = torch.tensor([[0.0, 1.0, 0.0]] * 3)
    assert inverse_cdf(probs, torch.tensor([0.0, 0.5, 0.999])).tolist() == [1, 1, 1]


def test_top_p_keeps_the_prefix_that_reaches_p() -> None:
    # probs [0.5, 0.3, 0.2], top_p 0.6: mass before each is [0, 0.5, 0.8] -> keep tokens 0, 1,
    # renormalised to [0.625, 0.375]. u = 0.99 lands on token 1, never on token 2.
    logits = _logits(0.5, 0.3, 0.2)
    assert _pick(logits, 0.99, top_p=0.6) == 1
    assert _pick(logits, 0.6, top_p=0.6) == 0  # 0.6 < 0.625
    assert _pick(logits, 0.99) == 2  # unfiltered, the tail is reachable


def test_top_k_and_greedy() -> None:
    # Sorted order is [1, 2, 0] for probs [0.2, 0.5, 0.3]; top_k=1 keeps token 1 only.
    logits = _logits(0.2, 0.5, 0.3)
    assert _pick(logits, 0.99, top_k=1) == 1
    # top_k=2 keeps tokens 1 and 2 renormalised to [0.625, 0.375]: u=0.7 -> token 2.
    assert _pick(logits, 0.7, top_k=2) == 2
    assert _pick(logits, 0.99, temperature=0.0) == 1


def test_a_row_draws_the_same_token_whatever_its_batch_mates() -> None:
    # Row 0: probs [0.2, 0.5, 0.3], no filter; in vocabulary order cdf [0.2, 0.7, 1.0], so
    # u = 0.1 -> token 0. A top-k row next to it must not make it walk the sorted order
    # [1, 2, 0] (cdf [0.5, 0.8, 1.0], which would give token 1).
    logits = _logits(0.2, 0.5, 0.3)
    assert _pick(logits, 0.1) == 0
    batch = next_tokens(
        torch.cat([logits, _logits(0.6, 0.3, 0.1)]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([0, 2]),
        torch.tensor([1.0, 0.9]),
        torch.tensor([0.1, 0.1]),
    )
    assert batch.tolist() == [0, 0]


def test_top_p_one_keeps_the_whole_distribution_next_to_a_filtered_row() -> None:
    # probs [0.5, 0.5, 1e-9]: in float32 the mass before the tail token rounds to 1.0, which a
    # top-p cut at 1.0 would drop. Row 0 (top_p = 1) must keep its exact softmax.
    logits = torch.cat([_logits(0.5, 0.5, 1e-9), _logits(0.5, 0.3, 0.2)])
    probs = filtered_probs(
        logits, torch.tensor([1.0, 1.0]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0])
    )
    assert torch.equal(probs[0], torch.softmax(logits[0], dim=-1)) and probs[0, 2] > 0
    assert probs[1].tolist() == [1.0, 0.0, 0.0]  # top_k = 1 keeps the most likely token


def test_temperature_sharpens() -> None:
    # probs [0.5, 0.5, ~0] stay equal at any temperature: u=0.49 -> 0, u=0.51 -> 1.
    logits = torch.tensor([[0.0, 0.0, -100.0]])
    assert _pick(logits, 0.49, temperature=0.5) == 0
    assert _pick(logits, 0.51, temperature=0.5) == 1
    # [0.6, 0.4] at T=0.5 becomes [0.36, 0.16]/0.52 = [0.692, 0.308]: u=0.65 -> token 0.
    assert _pick(_logits(0.6, 0.4), 0.65, temperature=0.5) == 0
    assert _pick(_logits(0.6, 0.4), 0.65) == 1  # at T=1, 0.65 >= 0.6


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(7, 0, 1) == derive_seed(7, 0, 1)
    assert len({derive_seed(7, p, s) for p in range(4) for s in range(4)}) == 16
    assert 0 <= derive_seed(-1, 0, 0) < 2**63


def test_find_stop_takes_the_earliest_match() -> None:
    assert find_stop("a cat. The end", (".", "end")) == 5
    assert find_stop("a cat. The end", ("end",), start=3) == 11
    assert find_stop("abc", ("x",)) is None


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (SamplingSpec(n=0), "sampling.n"),
        (SamplingSpec(n=65), "sampling.n"),
        (SamplingSpec(temperature=-0.1), "sampling.temperature"),
        (SamplingSpec(temperature=math.inf), "sampling.temperature"),
        (SamplingSpec(temperature=2.01), "sampling.temperature"),
        (SamplingSpec(n=2, temperature=0.0), "sampling.n"),
        (SamplingSpec(n=65, temperature=0.0), "sampling.n"),
        (SamplingSpec(top_p=0.0), "sampling.top_p"),
        (SamplingSpec(top_p=1.5), "sampling.top_p"),
        (SamplingSpec(top_k=-1), "sampling.top_k"),
        (SamplingSpec(max_tokens=513), "sampling.max_tokens"),
        (SamplingSpec(stop=("",)), "sampling.stop"),
    ],
)
def test_sampling_validation_names_the_field(spec: SamplingSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        spec.validate(max_n=64, max_model_len=512)
    assert [v.field for v in err.value.violations] == [field]


def test_prompt_lengths() -> None:
    check_prompt_lengths([[1] * 500], max_tokens=12, max_model_len=512)  # exactly fits
    with pytest.raises(InvalidArgument) as err:
        check_prompt_lengths([[1], [], [1] * 501], max_tokens=12, max_model_len=512)
    assert [v.field for v in err.value.violations] == ["prompts[1]", "prompts[2]"]
