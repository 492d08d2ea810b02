"""The `transformers` engine: the scheduler's batches decoded by our own loop (CPU or GPU)."""

from __future__ import annotations

import asyncio
import functools
import gc
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import torch

from services.rollout.decoding import DecodeContext, Row, decode
from services.rollout.domain import LOGPROB_TEMPERATURE, Completion, NoModelLoaded, PromptInput
from services.rollout.engine import EngineConfig, EngineRequest
from services.rollout.hf_weights import AdapterHandle, LoadedModel, check_load_args
from services.rollout.sampling import row_generator
from services.rollout.scheduler import END, Chunk, Job, Scheduler, Throughput


class TransformersEngine:
    name = "transformers"
    max_resident = 0  # as many models as the weight cache's budget allows

    def __init__(self, config: EngineConfig) -> None:
        self.device = config.device
        self.max_queue = config.max_queue
        self._models: dict[str, LoadedModel] = {}  # slot -> model
        self._last = ""  # the slot loaded last: what `slot=None` means
        self._meter = Throughput()
        self._decoding = False  # a batch is in the decode thread
        self._scheduler = Scheduler(
            self._run_batch, self._release, config.max_queue, config.max_batch_prompts
        )

    # Status ----------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.context_len()

    def context_len(self, slot: str | None = None) -> int:
        model = self._models.get(self._last if slot is None else slot)
        return model.max_model_len if model else 0

    def model_bytes(self, slot: str | None = None) -> int:
        model = self._models.get(self._last if slot is None else slot)
        return model.nbytes if model else 0

    @property
    def queue_depth(self) -> int:
        return self._scheduler.queue_depth

    @property
    def running(self) -> int:
        return self._scheduler.running

    @property
    def generated_tokens_total(self) -> int:
        return self._meter.total

    def tokens_per_second(self) -> float:
        return self._meter.rate()

    # Weights ---------------------------------------------------------------------------------

    def _model(self, slot: str | None = None) -> LoadedModel:
        model = self._models.get(self._last if slot is None else slot)
        if model is None:
            raise NoModelLoaded("no model is loaded; call LoadModel first")
        return model

    def _idle(self) -> bool:
        return not (self._decoding or self._scheduler.running or self._scheduler.queue_depth)

    async def load_model(
        self,
        path: Path,
        version: str,
        dtype: str,
        max_model_len: int | None,
        slot: str | None = None,
    ) -> None:
        """Batches already accepted keep the old object. With none, the slot's old model is
        dropped before the new one loads (half the peak memory); if that load then fails, the
        slot is empty."""
        slot = slot or version
        await asyncio.to_thread(check_load_args, path, dtype, max_model_len)
        if self._idle() and slot in self._models:
            await self.unload_model(slot)
        self._models[slot] = await asyncio.to_thread(
            LoadedModel, path, version, dtype, max_model_len, self.device
        )
        self._last = slot

    async def unload_model(self, slot: str) -> None:
        if self._models.pop(slot, None) is not None:
            await asyncio.to_thread(gc.collect)  # peft and hooks keep reference cycles

    async def push_weights(
        self,
        path: Path,
        slot: str,
        version: str,
        tensors: dict[str, torch.Tensor],
        reuse: str | None,
    ) -> None:
        """`load_state_dict` of the pushed tensors into the reused model (in place) or into a
        fresh copy of `path`; a tensor the model does not have, or of another shape, is refused
        before any weight changes."""
        model = self._models.get(reuse) if reuse else None
        if model is None:
            model = await asyncio.to_thread(LoadedModel, path, version, "auto", None, self.device)
        await asyncio.to_thread(model.load_weights, tensors)
        if reuse:
            self._models.pop(reuse, None)
        model.version = version
        self._models[slot] = model

    async def load_adapter(self, path: Path, version: str, slot: str | None = None) -> None:
        model = self._model(slot)
        if version not in model.adapters:
            await asyncio.to_thread(model.add_adapter, path, version)

    async def unload_adapter(self, version: str, slot: str | None = None) -> None:
        model = self._models.get(self._last if slot is None else slot)
        if model is None:
            return
        model.retire(version)
        if not self._decoding:  # else the decode thread deletes it before its next step
            await asyncio.to_thread(model.purge)

    # Generation ------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[PromptInput], slot: str | None = None) -> list[list[int]]:
        model = self._model(slot)
        return [model.encode(p) for p in prompts]

    async def generate(self, request: EngineRequest) -> AsyncIterator[list[Completion]]:
        model = self._model(request.model_slot)
        handle = model.acquire(request.adapter_version) if request.adapter_version else None
        seed = request.sampling.seed
        job = Job(
            key=(id(model), handle.internal_name if handle else None),
            prompt_ids=request.prompt_ids,
            sampling=request.sampling,
            seed=secrets.randbits(63) if seed is None else seed,
            payload=(model, handle),
            return_prompt_ids=request.return_prompt_ids,
            logprobs_mode=request.logprobs_mode,
        )
        try:
            self._scheduler.submit(job)
        except Exception:
            self._release(job)
            raise
        try:
            while True:
                items = [await job.out.get()]
                while not job.out.empty():
                    items.append(job.out.get_nowait())
                for item in items:
                    if isinstance(item, Exception):
                        raise item
                done = [i for i in items if isinstance(i, Completion)]
                if done:
                    yield done
                if items[-1] is END:
                    return
        finally:
            self._scheduler.cancel(job)  # a no-op once every completion was delivered

    def _release(self, job: Job) -> None:
        model, handle = job.payload
        if handle is not None:
            model.release(handle)
            job.payload = (model, None)

    async def _run_batch(self, chunks: list[Chunk]) -> None:
        model, handle = chunks[0].job.payload
        rows = [
            Row(
                prompt_ids=c.job.prompt_ids[p],
                generator=row_generator(c.job.seed, p, k),
                temperature=c.job.sampling.temperature,
                logprob_temperature=LOGPROB_TEMPERATURE[c.job.logprobs_mode](
                    c.job.sampling.temperature
                ),
                top_k=c.job.sampling.top_k,
                top_p=c.job.sampling.top_p,
                max_tokens=c.job.sampling.max_tokens,
                stop=c.job.sampling.stop,
                owner=c.job,
                prompt_index=p,
                sample_index=k,
            )
            for c in chunks
            for p in range(c.start, c.end)
            for k in range(c.job.sampling.n)
        ]
        rows = [r for r in rows if not r.owner.cancelled]
        if not rows:
            return
        loop = asyncio.get_running_loop()
        version = handle.version if handle else model.version

        def on_finish(row: Row) -> None:
            job: Job = row.owner
            completion = _completion(row, version, job)
            loop.call_soon_threadsafe(self._scheduler.deliver, job, completion)

        ctx = DecodeContext(
            forward=functools.partial(model.forward, handle.internal_name if handle else None),
            eos_ids=model.eos_ids,
            pad_id=model.pad_id,
            device=model.device,
            decode_text=model.decode_text,
            on_finish=on_finish,
            on_tokens=self._meter.add,
        )
        self._decoding = True
        try:
            await asyncio.to_thread(decode, rows, ctx)
        finally:
            self._decoding = False
        # The batch's deliveries ran before this point (released handles included): adapters
        # retired meanwhile are deleted now rather than at the next batch's first step.
        if model.has_dead:
            await asyncio.to_thread(model.purge)

    async def close(self) -> None:
        await self._scheduler.close()


def _completion(row: Row, version: str, job: Job) -> Completion:
    assert row.finish is not None
    return Completion(
        prompt_index=row.prompt_index,
        sample_index=row.sample_index,
        text=row.text,
        token_ids=row.tokens,
        logprobs=[] if job.sampling.skip_logprobs else row.logprobs,
        finish_reason=row.finish,
        policy_version=version,
        prompt_token_ids=row.prompt_ids if job.return_prompt_ids else [],
    )


__all__ = ["AdapterHandle", "TransformersEngine"]
