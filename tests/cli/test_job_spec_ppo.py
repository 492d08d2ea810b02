"""`tlm jobs create --method ppo`: PPO's flags land on `spec.ppo`, others' are refused."""

from __future__ import annotations

import pytest

from services.cli.job_spec import SpecError, build_spec


def test_ppo_flags_set_its_params_and_a_short_critic_name_is_completed() -> None:
    flags = {
        "base_model": "tiny",
        "dataset": "arith",
        "kl_coef": 0.1,
        "cliprange": 0.3,
        "vf_coef": 0.2,
        "gamma": 0.99,
        "lam": 0.9,
        "ppo_epochs": 2,
        "critic_model": "rm@r1",
        "samples_per_prompt": 8,
        "max_tokens": 6,
    }
    p = build_spec(None, "ppo", flags).ppo
    assert (p.kl_coef, p.cliprange, p.vf_coef, p.gamma, p.lam) == pytest.approx(
        (0.1, 0.3, 0.2, 0.99, 0.9)
    )
    assert p.ppo_epochs == 2 and p.critic_model == "models/rm/revisions/r1"
    assert (p.sampling.n, p.sampling.max_tokens) == (8, 6)


def test_a_ppo_flag_on_grpo_and_a_grpo_flag_on_ppo_are_refused() -> None:
    base = {"base_model": "tiny", "dataset": "arith"}
    with pytest.raises(SpecError, match="--kl-coef: grpo jobs have no such setting"):
        build_spec(None, "grpo", base | {"kl_coef": 0.1})
    with pytest.raises(SpecError, match="--num-generations: ppo jobs have no such setting"):
        build_spec(None, "ppo", base | {"num_generations": 4})
