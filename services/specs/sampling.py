"""Sampling parameters and their rules, shared by the rollout service (which samples) and the
trainer (which refuses a job whose sampling the rollout would refuse, at creation)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import FieldViolation, InvalidArgument

# Both engines sample at temperatures in [0, MAX_TEMPERATURE] (the OpenAI API's bound);
# above it the distribution is close to uniform over the vocabulary.
MAX_TEMPERATURE = 2.0
# Stop sequences a request (or a deployment's defaults) may set, as OpenAI's `stop`.
MAX_STOP = 4


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling shared by every prompt of a request; defaults follow the contract."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    skip_logprobs: bool = False

    def validate(self, max_n: int, max_model_len: int) -> None:
        """Raise InvalidArgument naming every bad field (`sampling.top_p`, ...)."""
        bad = self.problems(max_n, max_model_len)
        if bad:
            raise InvalidArgument(
                "; ".join(f"{v.field}: {v.description}" for v in bad), violations=bad
            )

    def problems(
        self, max_n: int, max_model_len: int, at: str = "sampling"
    ) -> list[FieldViolation]:
        """Every bad field, named under `at`; the trainer checks job specs with the same rules.

        >>> [v.field for v in SamplingSpec(n=2, temperature=0.0).problems(8, 128)]
        ['sampling.n']
        """
        bad: list[FieldViolation] = []
        if not 1 <= self.n <= max_n:
            bad.append(FieldViolation(f"{at}.n", f"must be in [1, {max_n}], got {self.n}"))
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also catches NaN and inf
            bad.append(FieldViolation(f"{at}.temperature", f"must be in [0, {MAX_TEMPERATURE:g}]"))
        elif self.temperature == 0 and 1 < self.n <= max_n:
            bad.append(
                FieldViolation(
                    f"{at}.n",
                    "must be 1 with temperature 0 (greedy decoding gives n identical completions)",
                )
            )
        if not 0 < self.top_p <= 1:
            bad.append(FieldViolation(f"{at}.top_p", "must be in (0, 1]"))
        if self.top_k < 0:
            bad.append(FieldViolation(f"{at}.top_k", "must be >= 0 (0 disables)"))
        if not 1 <= self.max_tokens <= max_model_len:
            bad.append(
                FieldViolation(f"{at}.max_tokens", f"must be in [1, {max_model_len}] (the context)")
            )
        if any(not s for s in self.stop):
            bad.append(FieldViolation(f"{at}.stop", "stop strings must be non-empty"))
        return bad
