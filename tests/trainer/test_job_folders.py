"""Job folders are named after the team, and a team is checked again before it becomes a path:
a job whose team is not a plain name (stored before teams were checked at the edge) fails
instead of writing outside the trainer's folder."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.trainer.domain import Job, JobState, Method, Progress
from services.trainer.spec import JobSpec, validate
from services.trainer.store import JobStore, new_job_id
from services.trainer.supervisor import Supervisor, WorkerConfig, job_folder
from tests.waiting import until


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield store
    store.close()


def _create(store: JobStore, team: str) -> tuple[str, str]:
    base, data = "models/b/revisions/r1", "datasets/d/revisions/r1"
    spec = validate(JobSpec(Method.SFT, base, data, output_model="models/succeed")).to_dict()
    job = Job(new_job_id(), team, spec, JobState.PENDING, {}, Progress(), datetime.now(UTC))
    store.create(job)
    return (team, job.job_id)


@pytest.mark.parametrize("team", ["../escape", "/tmp/escape", "a/../../escape", "..", ""])
def test_a_team_that_is_no_folder_name_has_no_job_folder(tmp_path: Path, team: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid team name"):
        job_folder(tmp_path / "jobs", (team, "j-1"))
    assert job_folder(tmp_path / "jobs", ("team-a", "j-1")) == tmp_path / "jobs" / "team-a" / "j-1"


async def test_a_job_of_a_bad_team_fails_without_writing_outside_the_root(
    store: JobStore, tmp_path: Path
) -> None:
    root = tmp_path / "trainer" / "jobs"
    config = WorkerConfig(root=root, max_running=1, module="tests.trainer.scripted_worker")
    supervisor = Supervisor(store, config, lambda key: None)
    key = _create(store, "../escape")
    supervisor.submit(*key)
    await until(lambda: store.get(*key).state.terminal and supervisor.running == 0, timeout=10)
    assert store.get(*key).state is JobState.FAILED
    assert not (tmp_path / "trainer" / "escape").exists()
    assert not list(tmp_path.rglob(key[1]))  # no folder for the job anywhere
