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
) -> torch.Tensor:
    """Sampling distribution after temperature, top-k (0 = off) and top-p (1 = off).

    logits (B, V) float; temperature, top_p (B,) float; top_k (B,) long -> probs (B, V), always
    in vocabulary order, so a row's distribution (and its draw) never depends on its batch mates.
    Top-p keeps the smallest prefix of the sorted tokens whose mass reaches p: a token stays while
    the mass before it is < p (Holtzman et al. 2020, "The Curious Case of Neural Text
    Degeneration"). Rows with top_p = 1 skip that cut: float32 rounding can make the mass before
    a tail token reach 1.0, which would drop it.
    """
    scaled = logits / temperature.clamp_min(1e-6).unsqueeze(1)  # (B, V)
    vocab = logits.shape[-1]
    use_p = top_p < 1  # (B,)
    if not bool((top_k > 0).any()) and not bool(use_p.any()):
        return torch.softmax(scaled, dim=-1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)  # (1, V)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)  # (B, 1)
    drop = rank >= k  # (B, V), sorted order
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V)
    drop |= (mass_before >= top_p.unsqueeze(1)) & use_p.unsqueeze(1)
    drop_in_vocab = torch.zeros_like(drop).scatter(1, order, drop)  # (B, V), vocabulary order
    return torch.softmax(scaled.masked_fill(drop_in_vocab, float("-inf")), dim=-1)


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
    choice = inverse_cdf(filtered_probs(logits, temperature, top_k, top_p), uniforms)  # (B,)
    return torch.where(temperature == 0, logits.argmax(dim=-1), choice)


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index in `text` of the earliest stop string found at or after `start`, else None.

    >>> find_stop("a cat. The end", (".", "end"))
    5
    """
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
