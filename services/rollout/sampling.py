"""Pure sampling math: per-row temperature / top-k / top-p, inverse-CDF draws, seeds, stops.

Every row carries its own parameters and its own uniform draw, so one batch can mix requests
and a row's tokens depend only on its seed (not on what it was batched with).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sequence, stable across processes and batch layouts.

    >>> derive_seed(7, 0, 1) == derive_seed(7, 0, 1) != derive_seed(7, 1, 0)
    True
    """
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(seed, prompt_index, sample_index))
    return generator


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]; zero-probability tokens are never chosen.

    probs (B, V), uniforms (B,) in [0, 1) -> (B,) long.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V)
    target = (uniforms * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    index = torch.searchsorted(cdf, target, right=True)  # (B, 1)
    return index.clamp_max(probs.shape[-1] - 1).squeeze(1)


def filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampling distribution after temperature, top-k (0 = off) and top-p (1 = off).

    logits (B, V) float; temperature, top_p (B,) float; top_k (B,) long. Returns probs (B, V),
    sorted descending when filtering was needed, with the sort order (B, V) (else None).
    Top-p keeps the smallest prefix whose mass reaches p: a token stays while the mass before
    it is < p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").
    """
    scaled = logits / temperature.clamp_min(1e-6).unsqueeze(1)  # (B, V)
    vocab = logits.shape[-1]
    if not bool((top_k > 0).any()) and not bool((top_p < 1).any()):
        return torch.softmax(scaled, dim=-1), None
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)  # (1, V)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)  # (B, 1)
    drop = rank >= k  # (B, V)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
    drop |= mass_before >= top_p.unsqueeze(1)
    return torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1), order


def next_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
) -> torch.Tensor:
    """One token per row: argmax where temperature is 0, else an inverse-CDF draw.

    logits (B, V) float; temperature, top_p, uniforms (B,); top_k (B,) long -> (B,) long.
    """
    probs, order = filtered_probs(logits, temperature, top_k, top_p)
    choice = inverse_cdf(probs, uniforms)  # (B,)
    if order is not None:
        choice = order.gather(1, choice.unsqueeze(1)).squeeze(1)
    return torch.where(temperature == 0, logits.argmax(dim=-1), choice)


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index in `text` of the earliest stop string found at or after `start`, else None.

    >>> find_stop("a cat. The end", (".", "end"))
    5
    """
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
