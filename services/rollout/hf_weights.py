"""A loaded Hugging Face model with its tokenizer and LoRA adapters (peft), for one revision.

Batches hold a reference to the `LoadedModel` they were accepted on, so LoadModel swaps in a
new object and running batches finish on the old weights. Adapters live side by side in one
PeftModel under unique internal names; each decode step selects its batch's adapter under a
lock, so loading a new adapter revision never changes what a running batch computes. A retired
adapter is deleted once no accepted request uses it: before the next step, or by `purge` when
no batch is decoding.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from services.common.errors import FailedPrecondition
from services.rollout.domain import DTYPE_NAMES, PromptInput, PromptRejected, invalid

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,  # float32 on CPU, the checkpoint's dtype on GPU
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
assert tuple(DTYPES) == DTYPE_NAMES
# from_pretrained builds on process-global state (the meta-device init context): two loads that
# overlap in one process (two engines, as tests run replicas) corrupt each other's weights.
_LOADING = threading.Lock()


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
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except (ValueError, jinja2.TemplateError) as exc:  # no template; a role it refuses
            raise PromptRejected(f"the model's chat template cannot render it: {exc}") from exc
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt.text)) if prompt.text else []


def check_load_args(path: Path, dtype: str, max_model_len: int | None) -> None:
    """Reject a bad dtype or context length from config.json alone, before loading weights."""
    if dtype not in DTYPES:
        raise invalid("dtype", f"expected one of {sorted(DTYPES)}, got {dtype!r}")
    limit = int(AutoConfig.from_pretrained(path).max_position_embeddings)
    if max_model_len is not None and not 0 < max_model_len <= limit:
        raise invalid("max_model_len", f"must be in [1, {limit}] for this model")


class LoadedModel:
    def __init__(
        self, path: Path, version: str, dtype: str, max_model_len: int | None, device: str
    ) -> None:
        if dtype not in DTYPES:
            raise invalid("dtype", f"expected one of {sorted(DTYPES)}, got {dtype!r}")
        torch_dtype = DTYPES[dtype] or (torch.float32 if device == "cpu" else "auto")
        with _LOADING:
            model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        self.model: Any = model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        limit = int(self.model.config.max_position_embeddings)
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise invalid("max_model_len", f"must be in [1, {limit}] for this model")
        self.max_model_len = max_model_len or limit
        self.version = version
        self.device = torch.device(device)
        self.nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        self.adapters: dict[str, AdapterHandle] = {}  # version -> handle
        self._lock = threading.Lock()
        self._peft: Any = None
        self._counter = 0
        self._selected: str | bool | None = False  # False: nothing selected yet
        # Internal names to delete. Appended on the event loop, drained under _lock by the
        # decode thread; deque append/popleft are atomic, so no name is lost in between.
        self._dead: collections.deque[str] = collections.deque()

    # Tokens --------------------------------------------------------------------------------

    def encode(self, prompt: PromptInput) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def decode_text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # Pushed weights (blocking: call from a worker thread) -----------------------------------

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy pushed tensors over the weights of the same names, in place (cast to the model's
        dtype and device). Every name and shape is checked before any weight changes."""
        own = self.model.state_dict()
        for name, tensor in tensors.items():
            if name not in own:
                raise invalid("chunk.name", f"{name!r} is not a weight of {self.version}")
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise invalid(
                    "chunk.shape",
                    f"{name} has shape {list(tensor.shape)}; "
                    f"the model's is {list(own[name].shape)}",
                )
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor)

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

    def _delete_dead(self, keep: str | None) -> None:
        """Delete retired adapters except `keep` (a cancelled batch may take one more step on
        it). Call with _lock held."""
        kept = []
        while self._dead:
            name = self._dead.popleft()
            if name == keep:
                kept.append(name)
            else:
                self._delete_adapter(name)
        self._dead.extend(kept)

    def _delete_adapter(self, name: str) -> None:
        """Delete adapter `name`. Deleting the active one makes peft pick another and warn
        (every policy push of a LoRA job would log it): another is made active first."""
        tuner = self._peft.base_model
        if name in tuner.active_adapters:
            others = [a for a in self._peft.peft_config if a != name]
            if others:
                tuner.set_adapter(others[-1])  # the newest; the next forward selects anyway
        self._peft.delete_adapter(name)
        self._selected = False

    @property
    def has_dead(self) -> bool:
        return bool(self._dead)

    def purge(self) -> None:
        """Delete retired adapters now; only while no batch decodes on this model."""
        with self._lock:
            self._delete_dead(keep=None)

    # Forward ---------------------------------------------------------------------------------

    def forward(self, adapter: str | None, **inputs: Any) -> Any:
        """One model call with `adapter` (internal name) selected, or the bare base model."""
        with self._lock:
            self._delete_dead(keep=adapter)
            if self._peft is not None and self._selected != adapter:
                tuner = self._peft.base_model
                if adapter is None:
                    tuner.disable_adapter_layers()
                else:
                    tuner.enable_adapter_layers()
                    tuner.set_adapter(adapter)
                self._selected = adapter
            return self.model(**inputs)
