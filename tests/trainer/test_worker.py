"""The worker's pieces on CPU without a server: row shaping and loss masks on the tiny model,
the precision weights load in, resuming, cancellation, upload retries and LoRA targets."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from services.clients.errors import to_domain
from services.common.errors import InvalidArgument, PermissionDenied, TlmError, Unavailable
from services.trainer import trl_methods, worker
from services.trainer.distributed import CANCEL_FILE
from services.trainer.domain import Method
from services.trainer.spec import JobSpec, LoraParams, TrainingParams, validate
from services.trainer.worker_io import WorkerContext, check_lora_targets, retrying
from services.trainer.worker_protocol import EventWriter, WorkerJob

BASE = "models/tiny/revisions/r1"
DATA = "datasets/d/revisions/r1"
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You count."},
            {"role": "user", "content": f"Say {i}"},
            {"role": "assistant", "content": f"{i}"},
        ]
    }
    for i in range(3)
]


def _context(tmp_path: Path, spec: JobSpec, **job: Any) -> WorkerContext:
    worker_job = WorkerJob(
        name="jobs/j-1",
        team="a",
        spec=spec.to_dict(),
        device_plan={"device_type": "cpu", "precision": "fp32"},
        registry_address="127.0.0.1:1",
        rollout_address="",
        reward_address="",
        cache_dir=str(tmp_path / "cache"),
        **job,
    )
    worker_job.write(tmp_path)
    return WorkerContext(
        worker_job,
        spec,
        tmp_path,
        EventWriter(tmp_path),
        threading.Event(),
        None,  # type: ignore[arg-type]
    )


def _trained_tokens(tmp_path: Path, model_dir: Path, rows: list[dict[str, Any]]) -> tuple[int, int]:
    """(tokens with a label, tokens) of one batch of the SFT trainer the worker builds."""
    from transformers import AutoTokenizer

    training = TrainingParams(per_device_batch_size=len(rows), max_length=64, save_every=0)
    spec = validate(JobSpec(Method.SFT, BASE, DATA, lora=None, training=training))
    ctx = _context(tmp_path, spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shaped = trl_methods.uniform([trl_methods.sft_row(r) for r in rows])
    callback = trl_methods.EventsCallback(ctx)
    trainer = trl_methods._trainer(ctx, model_dir, tokenizer, shaped, [], callback)
    batch = next(iter(trainer.get_train_dataloader()))
    return int((batch["labels"] != -100).sum()), int(batch["attention_mask"].sum())


def test_chat_rows_train_only_the_last_assistant_turn(tiny_model_dir: Path, tmp_path: Path) -> None:
    trained, total = _trained_tokens(tmp_path, tiny_model_dir, CHAT)
    # Each completion is one digit plus the template's end of turn; the prompt is masked.
    assert 0 < trained <= 3 * 3 and total > 3 * trained


def test_text_rows_of_a_mixed_dataset_train_only_the_completion(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rows = [CHAT[0], {"prompt": "What is one plus one, in digits?", "completion": "2"}]
    trained, total = _trained_tokens(tmp_path, tiny_model_dir, rows)
    assert 0 < trained <= 2 * 3 and total > 3 * trained


def test_mixed_prompts_become_chat_for_every_method() -> None:
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
    ]
    shaped = trl_methods.uniform([trl_methods.preference_row(r) for r in rows])
    for row in shaped:
        assert row["prompt"] == [{"role": "user", "content": "q"}]
        assert row["chosen"] == [{"role": "assistant", "content": "a"}]
    text = [{"prompt": "q", "completion": "a", "label": True}]
    assert trl_methods.uniform(text) == text
    multi = trl_methods.sft_row(
        {"messages": [*CHAT[0]["messages"], {"role": "user", "content": "more"}]}
    )
    assert multi["completion"] == [{"role": "assistant", "content": "0"}]
    assert [m["role"] for m in multi["prompt"]] == ["system", "user"]


def test_full_tuning_loads_fp32_weights_and_lora_the_plan_precision(tiny_model_dir: Path) -> None:
    recipe = trl_methods.RECIPES[Method.SFT]
    full = JobSpec(Method.SFT, BASE, DATA, lora=None)
    lora = JobSpec(Method.SFT, BASE, DATA, lora=LoraParams())
    model = trl_methods.load_model(tiny_model_dir, recipe, full, "bf16", None)
    assert model.dtype == torch.float32  # bf16 autocast; the updates land in fp32
    model = trl_methods.load_model(tiny_model_dir, recipe, lora, "bf16", None)
    assert model.dtype == torch.bfloat16


def test_resume_from_the_recorded_checkpoint_and_drop_later_ones(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    # checkpoint-6 may be half-written: the service only heard of the save at step 4.
    assert trl_methods.resume_checkpoint(tmp_path, 4) == str(tmp_path / "checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert trl_methods.resume_checkpoint(tmp_path, 8) is None


def test_a_cancel_during_the_upload_keeps_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _worker_with(tmp_path, monkeypatch, "tests.trainer.fake_runner")
    assert worker.main(tmp_path) == 0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["result"]
    assert events[0]["output_model_revision"] == "models/m/revisions/r1"


def _worker_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: str) -> None:
    """An SFT job's folder whose worker runs `runner` (a module), in this process."""
    ctx = _context(tmp_path, validate(JobSpec(Method.SFT, BASE, DATA)))
    ctx.events.close()
    monkeypatch.setitem(worker.RUNNERS, Method.SFT, runner)
    monkeypatch.setattr(worker, "_die_with_parent", lambda: None)
    monkeypatch.setattr(worker.signal, "signal", lambda *args: None)


def _stopped_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A worker whose runner is stopped by a SIGTERM; the signals it would die by, recorded."""
    _worker_with(tmp_path, monkeypatch, "tests.trainer.cancelled_runner")
    deaths: list[int] = []
    monkeypatch.setattr(worker, "die_by", lambda sig: deaths.append(sig) or 128 + sig)
    return deaths


def _event_kinds(folder: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in (folder / "events.jsonl").read_text().splitlines()]


def test_a_sigterm_after_the_cancel_file_is_a_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deaths = _stopped_worker(tmp_path, monkeypatch)
    (tmp_path / CANCEL_FILE).touch()  # what Workers.stop writes before it signals
    assert worker.main(tmp_path) == 0
    assert _event_kinds(tmp_path) == ["cancelled"]
    assert deaths == []


def test_a_sigterm_without_the_cancel_file_dies_by_it_to_be_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes eviction SIGTERMs a lone worker too: no cancel, a death the supervisor
    restarts from the last checkpoint."""
    deaths = _stopped_worker(tmp_path, monkeypatch)
    assert worker.main(tmp_path) == 128 + signal.SIGTERM
    assert _event_kinds(tmp_path) == ["log"]
    assert deaths == [signal.SIGTERM]


def _rpc_error(code: grpc.StatusCode) -> TlmError:
    """What the registry client raises for a call that failed with `code`."""
    return to_domain(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"))


async def test_uploads_retry_unavailable_and_deadline_only() -> None:
    failures = [
        _rpc_error(grpc.StatusCode.UNAVAILABLE),
        _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED),
    ]
    logs: list[str] = []

    async def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "models/m/revisions/r1"

    assert await retrying(flaky, lambda m, level: logs.append(m), (0, 0)) == "models/m/revisions/r1"
    assert len(logs) == 2

    async def refused() -> str:
        raise _rpc_error(grpc.StatusCode.PERMISSION_DENIED)

    with pytest.raises(PermissionDenied):
        await retrying(refused, lambda m, level: logs.append(m), (0, 0))
    assert len(logs) == 2
    failures.extend([_rpc_error(grpc.StatusCode.UNAVAILABLE)] * 2)
    with pytest.raises(Unavailable):  # out of retries
        await retrying(flaky, lambda m, level: None, (0,))


def test_unknown_lora_targets_are_invalid_argument(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    good = JobSpec(Method.SFT, BASE, DATA, lora=LoraParams(target_modules=("q_proj", "v_proj")))
    check_lora_targets(good, model)
    bad = JobSpec(Method.SFT, BASE, DATA, lora=LoraParams(target_modules=("q_proj", "qproj")))
    with pytest.raises(InvalidArgument) as err:
        check_lora_targets(bad, model)
    assert [v.field for v in err.value.violations] == ["spec.tuning.lora.target_modules"]
    assert "qproj" in err.value.message and "q_proj" not in err.value.message.split(";")[0]
