"""Trainer fixtures: the four services in one server (trainer with two worker slots), a tiny
model and one dataset of every kind pushed to its registry, and helpers to follow jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from services.common.settings import ServerSettings
from services.devtools.server_thread import ServerThread
from services.registry.client import RegistryClient
from services.trainer import app as trainer_app
from services.trainer.settings import TrainerSettings
from services.trainer.worker_protocol import EventTailer
from tests.waiting import POLL_S
from tlm.registry.v1 import registry_pb2
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

TERMINAL = {
    pb.TrainingJob.STATE_SUCCEEDED,
    pb.TrainingJob.STATE_FAILED,
    pb.TrainingJob.STATE_CANCELLED,
}
EVALUATOR = {"scorers": [{"name": "has_digit", "regex": {"pattern": "[0-9]"}}]}
# The random tiny model's completions hold different numbers of vowels: rewards vary within a
# GRPO group, so the advantages are not all zero.
VOWELS = {"scorers": [{"name": "vowels", "regex": {"pattern": "[aeiou]", "count": True}}]}


def start_stack(data_dir: Path, **trainer: object) -> ServerThread:
    """registry + reward + rollout as `tlm up` wires them, and a trainer with `trainer` settings."""
    from services.embedded import bindings_for

    shared = ServerSettings(host="127.0.0.1", port=0, data_dir=data_dir, insecure_dev=True)
    values: dict[str, object] = {"data_dir": data_dir, "insecure_dev": True, "max_running_jobs": 2}
    settings = TrainerSettings.model_validate(values | trainer)

    def make():  # type: ignore[no-untyped-def]
        return [
            *bindings_for(("registry", "reward", "rollout"), shared),
            trainer_app.binding(settings),
        ]

    return ServerThread(make, shared).start()


def start_trainer(
    data_dir: Path, registry_address: str, worker_module: str, **overrides: object
) -> ServerThread:
    """A trainer alone, using another server's registry, with its own worker entry point."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 0,
        "data_dir": data_dir,
        "insecure_dev": True,
        "registry_address": registry_address,
    }
    settings = TrainerSettings.model_validate(values | overrides)
    return ServerThread(lambda: [trainer_app.binding(settings, worker_module)], settings).start()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = start_stack(tmp_path_factory.mktemp("trainer-stack"))
    yield server
    server.stop()


@dataclass(frozen=True)
class Inputs:
    base: str  # resolved base model revision
    sft: str
    chat: str
    preference: str
    unpaired: str
    prompts: str
    evaluator: str


ROWS = {
    "sft": [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}"} for i in range(8)],
    "chat": [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}"},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
        for i in range(8)
    ],
    "preference": [
        {"prompt": f"What is {i} + 1?", "chosen": f" {i + 1}", "rejected": " cat"} for i in range(8)
    ],
    "unpaired": [
        {
            "prompt": f"What is {i} + 1?",
            "completion": f" {i + 1}" if i % 2 else " dog",
            "label": bool(i % 2),
        }
        for i in range(8)
    ],
    "prompts": [{"prompt": f"What is {i} + 2?", "reference": str(i + 2)} for i in range(4)],
}
KINDS = {
    "sft": registry_pb2.DATASET_KIND_SFT,
    "chat": registry_pb2.DATASET_KIND_SFT,
    "preference": registry_pb2.DATASET_KIND_PREFERENCE,
    "unpaired": registry_pb2.DATASET_KIND_UNPAIRED_PREFERENCE,
    "prompts": registry_pb2.DATASET_KIND_PROMPT,
}


@pytest.fixture(scope="session")
async def inputs(
    stack: ServerThread, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Inputs:
    folder = tmp_path_factory.mktemp("datasets")
    registry = RegistryClient(stack.address)
    try:
        await registry.stub.CreateModel(
            registry_pb2.CreateModelRequest(model_id="tiny"), metadata=registry.metadata()
        )
        base = await registry.upload_model_revision("models/tiny", tiny_model_dir)
        names = {}
        for name, rows in ROWS.items():
            path = folder / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            revision = await registry.upload_dataset_file(f"datasets/{name}", path, KINDS[name])
            names[name] = revision.name
        evaluator = await registry.create_evaluator_revision(
            "evaluators/digits", json.dumps(EVALUATOR)
        )
    finally:
        await registry.close()
    return Inputs(base=base.name, evaluator=evaluator.name, **names)


async def push_vowels(stack: ServerThread, name: str, request_id: str = "") -> str:
    """Push VOWELS as the evaluator `name`; its revision's name."""
    registry = RegistryClient(stack.address)
    try:
        revision = await registry.create_evaluator_revision(
            name, json.dumps(VOWELS), request_id=request_id
        )
    finally:
        await registry.close()
    return revision.name


@pytest.fixture(scope="session")
async def trainer(stack: ServerThread) -> AsyncIterator[trainer_pb2_grpc.TrainerServiceStub]:
    channel = grpc.aio.insecure_channel(stack.address)
    yield trainer_pb2_grpc.TrainerServiceStub(channel)
    await channel.close()


def spec(method: int, base: str, dataset: str, **fields: object) -> pb.TrainingJobSpec:
    """A tiny, fast spec: a few steps, short sequences, checkpoints off unless asked."""
    training = pb.TrainingParams(
        max_steps=3,
        per_device_batch_size=2,
        max_length=32,
        log_every=1,
        save_every=0,
        learning_rate=1e-3,
    )
    return pb.TrainingJobSpec(
        method=method,  # type: ignore[arg-type]
        base_model=base,
        train_dataset=dataset,
        training=fields.pop("training", training),  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


async def wait_for(
    stub: trainer_pb2_grpc.TrainerServiceStub, name: str, timeout: float = 120.0
) -> pb.TrainingJob:
    deadline = time.monotonic() + timeout
    while True:
        job = await stub.GetTrainingJob(pb.GetTrainingJobRequest(name=name))
        if job.state in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"{name} still {pb.TrainingJob.State.Name(job.state)}"
        await asyncio.sleep(0.3)


async def watch(
    stub: trainer_pb2_grpc.TrainerServiceStub, name: str, start: int = 0
) -> list[pb.JobEvent]:
    request = pb.WatchTrainingJobRequest(name=name, from_sequence=start)
    return [event async for event in stub.WatchTrainingJob(request, timeout=180)]


def worker_events(folder: Path) -> list[dict[str, Any]]:
    """The events a job's worker (rank 0) has written to its folder so far; a line it is
    still writing is left out."""
    return EventTailer(folder).read_new()


def reported(folder: Path, kind: str, step: int = 0) -> bool:
    """Whether the worker has written a `kind` event (metrics, checkpoint) of step `step` or
    later."""
    return any(e["kind"] == kind and e.get("step", 0) >= step for e in worker_events(folder))


PAUSED: list[psutil.Process] = []  # what paused_when stopped: let go after each test


@pytest.fixture(autouse=True)
def _let_paused_go() -> Iterator[None]:
    """A test that fails while a job's processes are stopped lets them go: a group left stopped
    would hold one of the session trainer's job slots to the end."""
    yield
    resume(PAUSED)
    PAUSED.clear()


async def paused_when(
    find: Callable[[], list[psutil.Process]],
    reached: Callable[[list[psutil.Process]], bool],
    what: str,
    timeout: float = 240.0,
    at_least: int = 1,
) -> list[psutil.Process]:
    """The job's processes (`find()`: its worker, or its ranks; none until they run), stopped
    (SIGSTOP) once `reached(processes)`. The tiny model's steps take a tenth of a second: a
    test that stopped the job after seeing an event could find it steps further on a loaded
    host, or done. So the processes are stopped while each check runs and let go for one poll
    between checks: the job gets no further than that poll (10 ms, or as late as the test's
    thread wakes) past the event, and not at all while the test's thread is slow to check.
    `find` is asked again only while it has found fewer than `at_least` (`kept`).
    `resume(processes)` lets them go (at the test's end at the latest)."""
    find, deadline, seen = kept(find, at_least), time.monotonic() + timeout, False
    while True:
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {what}"
        processes = [p for p in find() if _stopped(p)]
        try:
            if seen and not processes:
                raise AssertionError(f"the job's processes ended before {what}")
            seen = seen or bool(processes)
            if processes and reached(processes):
                PAUSED.extend(processes)
                return processes
        except BaseException:
            resume(processes)
            raise
        resume(processes)
        await asyncio.sleep(POLL_S)


def kept(
    find: Callable[[], list[psutil.Process]], at_least: int = 1
) -> Callable[[], list[psutil.Process]]:
    """`find`, asked again only while it has found fewer than `at_least` processes or one of
    them has exited: a search reads every process's command line, while the job runs."""
    found: list[psutil.Process] = []

    def again() -> list[psutil.Process]:
        nonlocal found
        if len(found) < at_least or not all(p.is_running() for p in found):
            found = find()
        return found

    return again


def _stopped(process: psutil.Process) -> bool:
    """SIGSTOP to `process`; False if it has exited."""
    try:
        process.suspend()
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def resume(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.resume()
