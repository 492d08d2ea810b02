"""A loaded Hugging Face model with its tokenizer and LoRA adapters (peft), for one revision.

Batches hold a reference to the `LoadedModel` they were accepted on, so LoadModel swaps in a
new object and running batches finish on the old weights. Adapters live side by side in one
PeftModel under unique internal names; each decode step selects its batch's adapter under a
lock, so loading a new adapter revision never changes what a running batch computes. A retired
adapter is deleted once no accepted request uses it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.errors import FailedPrecondition
from services.rollout.domain import PromptInput, invalid

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,  # float32 on CPU, the checkpoint's dtype on GPU
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(eq=False)
class AdapterHandle:
    version: str
    internal_name: str
    load_time: float
    users: int = 0
    retired: bool = False


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)


def encode_prompt(tokenizer: Any, prompt: PromptInput) -> list[int]:
    """Token ids of raw text, or of chat messages rendered by the tokenizer's chat template."""
    if prompt.messages is not None:
        messages = [{"role": r, "content": c} for r, c in prompt.messages]
        if not messages:
            return []
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt.text)) if prompt.text else []


class LoadedModel:
    def __init__(
        self, path: Path, version: str, dtype: str, max_model_len: int | None, device: str
    ) -> None:
        if dtype not in DTYPES:
            raise invalid("dtype", f"expected one of {sorted(DTYPES)}, got {dtype!r}")
        torch_dtype = DTYPES[dtype] or (torch.float32 if device == "cpu" else "auto")
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        self.model: Any = model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        limit = int(self.model.config.max_position_embeddings)
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise invalid("max_model_len", f"must be in [1, {limit}] for this model")
        self.max_model_len = max_model_len or limit
        self.version = version
        self.device = torch.device(device)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        self.adapters: dict[str, AdapterHandle] = {}  # version -> handle
        self._lock = threading.Lock()
        self._peft: Any = None
        self._counter = 0
        self._selected: str | bool | None = False  # False: nothing selected yet
        self._dead: list[str] = []  # internal names to delete

    # Tokens --------------------------------------------------------------------------------

    def encode(self, prompt: PromptInput) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def decode_text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # Adapters (blocking: call from a worker thread) ----------------------------------------

    def add_adapter(self, path: Path, version: str) -> AdapterHandle:
        from peft import PeftModel

        with self._lock:
            self._counter += 1
            name = f"adapter{self._counter}"
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                self._peft.load_adapter(path, adapter_name=name)
            self._peft.eval()
            self._selected = False  # loading may change which adapter peft marks active
        handle = AdapterHandle(version, name, time.time())
        self.adapters[version] = handle
        return handle

    def acquire(self, version: str) -> AdapterHandle:
        handle = self.adapters.get(version)
        if handle is None:
            raise FailedPrecondition(
                f"adapter {version!r} is not loaded; call LoadAdapter first",
                metadata={"adapter_revision": version},
            )
        handle.users += 1
        return handle

    def release(self, handle: AdapterHandle) -> None:
        handle.users -= 1
        self._collect(handle)

    def retire(self, version: str) -> None:
        handle = self.adapters.pop(version, None)
        if handle is not None:
            handle.retired = True
            self._collect(handle)

    def _collect(self, handle: AdapterHandle) -> None:
        if handle.retired and handle.users == 0:
            self._dead.append(handle.internal_name)  # deleted under the lock, before a step

    # Forward ---------------------------------------------------------------------------------

    def forward(self, adapter: str | None, **inputs: Any) -> Any:
        """One model call with `adapter` (internal name) selected, or the bare base model."""
        with self._lock:
            if any(name != adapter for name in self._dead):
                for name in self._dead:
                    if name != adapter:  # a cancelled batch may take one more step on it
                        self._peft.delete_adapter(name)
                self._dead = [name for name in self._dead if name == adapter]
                self._selected = False
            if self._peft is not None and self._selected != adapter:
                tuner = self._peft.base_model
                if adapter is None:
                    tuner.disable_adapter_layers()
                else:
                    tuner.enable_adapter_layers()
                    tuner.set_adapter(adapter)
                self._selected = adapter
            return self.model(**inputs)
