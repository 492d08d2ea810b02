"""Rollout fixtures: LoRA adapters on the tiny model, and rollout servers over local folders."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from services.devtools.server_thread import ServerThread
from services.rollout import app
from services.rollout.settings import RolloutSettings
from services.rollout.weights import LocalWeights, ResolvedRevision, WeightFormat

MODEL = "models/tiny/revisions/r1"
OTHER_MODEL = "models/other/revisions/r1"
LORA_R1 = "models/tiny-lora/revisions/r1"
LORA_R2 = "models/tiny-lora/revisions/r2"
FOREIGN_LORA = "models/other-lora/revisions/r1"
NO_CHAT_MODEL = "models/no-chat/revisions/r1"  # the tiny model without a chat template
STRICT_CHAT_MODEL = "models/strict-chat/revisions/r1"  # a template that refuses "system"
STRICT_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('only user and assistant roles') }}{%- endif %}"
    "{{- m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
)


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter whose lora_B is random (peft starts it at zero: a no-op adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=1.0)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def lora_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("lora")
    return [make_adapter(tiny_model_dir, root / f"a{seed}", seed) for seed in (1, 2)]


@pytest.fixture(scope="session")
def chat_variant_dirs(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """Copies of the tiny model: one without a chat template, one with a strict template."""
    root = tmp_path_factory.mktemp("chat-variants")
    no_chat = Path(shutil.copytree(tiny_model_dir, root / "no-chat"))
    (no_chat / "chat_template.jinja").unlink()
    strict = Path(shutil.copytree(tiny_model_dir, root / "strict"))
    (strict / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return no_chat, strict


@pytest.fixture(scope="session")
def local_weights(
    tiny_model_dir: Path, lora_dirs: list[Path], chat_variant_dirs: tuple[Path, Path]
) -> LocalWeights:
    weights = LocalWeights()
    weights.add(ResolvedRevision(NO_CHAT_MODEL, WeightFormat.FULL, chat_variant_dirs[0]))
    weights.add(ResolvedRevision(STRICT_CHAT_MODEL, WeightFormat.FULL, chat_variant_dirs[1]))
    weights.add(ResolvedRevision(MODEL, WeightFormat.FULL, tiny_model_dir), "models/tiny")
    weights.add(ResolvedRevision(OTHER_MODEL, WeightFormat.FULL, tiny_model_dir))
    lora = WeightFormat.LORA
    weights.add(ResolvedRevision(LORA_R1, lora, lora_dirs[0], "models/tiny"))
    weights.add(ResolvedRevision(LORA_R2, lora, lora_dirs[1], MODEL))
    weights.add(ResolvedRevision(FOREIGN_LORA, lora, lora_dirs[0], OTHER_MODEL))
    return weights


RolloutServerFactory = Callable[..., ServerThread]


@pytest.fixture
def rollout_server(local_weights: LocalWeights) -> Iterator[RolloutServerFactory]:
    """Start rollout-only servers over `local_weights`; keyword arguments are settings."""
    started: list[ServerThread] = []

    def start(**overrides: object) -> ServerThread:
        values: dict[str, object] = {"host": "127.0.0.1", "port": 0, "insecure_dev": True}
        settings = RolloutSettings.model_validate(values | overrides)
        server = ServerThread(lambda: [app.binding(settings, local_weights)], settings).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
