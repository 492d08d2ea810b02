"""Job metrics as TensorBoard event files: a trainer whose scripted worker logs four steps of
RL metrics writes them to `<job folder>/tensorboard/`, read back with TensorBoard's own
EventAccumulator; a folder that cannot be written never fails the job."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.devtools.server_thread import ServerThread
from services.trainer.supervisor import job_folder
from services.trainer.tensorboard_log import TENSORBOARD, TensorBoardLog
from services.trainer.worker_protocol import EVENTS_FILE
from tests.trainer.conftest import TERMINAL, Inputs, spec, start_trainer
from tests.trainer.scripted_worker import STEPS, metrics
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc


def run_metrics_job(
    stack: ServerThread, inputs: Inputs, data_dir: Path
) -> tuple[ServerThread, str]:
    """A trainer with the scripted worker (the stack's registry) and one finished job that
    logged `scripted_worker.metrics(step)` for steps 1..4 and `eval_loss` at step 4."""
    server = start_trainer(data_dir, stack.address, "tests.trainer.scripted_worker")
    with grpc.insecure_channel(server.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        request = pb.CreateTrainingJobRequest(
            spec=spec(pb.METHOD_SFT, inputs.base, inputs.sft, output_model="models/metrics")
        )
        name = stub.CreateTrainingJob(request).name
        deadline = time.monotonic() + 60
        while (job := stub.GetTrainingJob(pb.GetTrainingJobRequest(name=name))).state not in (
            TERMINAL
        ):
            assert time.monotonic() < deadline, "the scripted job did not end"
            time.sleep(0.1)
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    return server, name


@pytest.fixture(scope="module")
def metrics_job(
    stack: ServerThread, inputs: Inputs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, str, str]]:
    data_dir = tmp_path_factory.mktemp("tensorboard-trainer")
    server, name = run_metrics_job(stack, inputs, data_dir)
    yield data_dir, name, server.address
    server.stop()


def test_every_metric_is_a_scalar_per_step(metrics_job: tuple[Path, str, str]) -> None:
    """One scalar per metric name per step, tagged as transformers' TensorBoardCallback tags
    TRL's logs (`train/...`, `eval/...`), in the job's folder; it outlives the job (only
    scratch folders are removed when a job succeeds)."""
    data_dir, name, _ = metrics_job
    folder = job_folder(data_dir / "trainer" / "jobs", ("dev", name.removeprefix("jobs/")))
    board = EventAccumulator(str(folder / TENSORBOARD))
    board.Reload()
    expected = {f"train/{k}" for k in metrics(1)} | {"eval/loss"}
    assert set(board.Tags()["scalars"]) == expected
    for metric in metrics(1):
        scalars = board.Scalars(f"train/{metric}")
        assert [s.step for s in scalars] == list(range(1, STEPS + 1))
        want = [metrics(step)[metric] for step in range(1, STEPS + 1)]
        assert [s.value for s in scalars] == pytest.approx(want)
    assert [(s.step, s.value) for s in board.Scalars("eval/loss")] == [(STEPS, 0.5)]


def test_event_times_are_the_workers_own(metrics_job: tuple[Path, str, str]) -> None:
    """A metrics event's time is when the worker logged it (its stamp in events.jsonl), not when
    the service read the file (every poll_s, which rounded step times to 0.2 s)."""
    data_dir, name, address = metrics_job
    folder = job_folder(data_dir / "trainer" / "jobs", ("dev", name.removeprefix("jobs/")))
    lines = [json.loads(line) for line in (folder / EVENTS_FILE).read_text().splitlines()]
    stamps = [e["time"] for e in lines if e["kind"] == "metrics"]
    with grpc.insecure_channel(address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        events = stub.WatchTrainingJob(pb.WatchTrainingJobRequest(name=name), timeout=30)
        times = [e.time.ToNanoseconds() / 1e9 for e in events if e.HasField("metrics")]
    assert len(times) == len(stamps) == STEPS + 1  # and the eval metrics of the last step
    assert times == pytest.approx(stamps, abs=1e-5)


def test_a_folder_that_cannot_be_written_ends_the_log_not_the_job(tmp_path: Path) -> None:
    (tmp_path / TENSORBOARD).write_text("a file where the folder should be")
    log = TensorBoardLog(tmp_path)
    log.scalars(1, {"loss": 1.0})  # logged as a warning, not raised
    log.scalars(2, {"loss": 0.5})
    log.close()
    assert (tmp_path / TENSORBOARD).is_file()
