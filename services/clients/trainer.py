"""The trainer service's client: jobs (create, read, list, cancel, watch) and estimates."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.clients.base import ServiceClient
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc


class TrainerClient(ServiceClient):
    """Async client of the TrainerService."""

    service = "trainer"
    descriptor = pb.DESCRIPTOR
    stub_class = trainer_pb2_grpc.TrainerServiceStub

    async def create_job(
        self, request: pb.CreateTrainingJobRequest, team: str | None = None
    ) -> pb.TrainingJob:
        """Create a job (or, with `validate_only`, check the spec and fill in defaults). Its
        `request_id` makes a retried create return the first job."""
        return await self._call(self.stub.CreateTrainingJob, request, team)

    async def get_job(self, name: str, team: str | None = None) -> pb.TrainingJob:
        return await self._call(self.stub.GetTrainingJob, pb.GetTrainingJobRequest(name=name), team)

    async def list_jobs(
        self, request: pb.ListTrainingJobsRequest, team: str | None = None
    ) -> list[pb.TrainingJob]:
        """Every job the request's filters select, page after page."""
        return await self._every_page(self.stub.ListTrainingJobs, request, "jobs", team)

    async def cancel_job(self, name: str, team: str | None = None) -> pb.TrainingJob:
        request = pb.CancelTrainingJobRequest(name=name)
        return await self._call(self.stub.CancelTrainingJob, request, team)

    def watch(
        self,
        name: str,
        from_sequence: int = 0,
        team: str | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[pb.JobEvent]:
        """The job's events from `from_sequence` on, until it ends (or `timeout_s`)."""
        request = pb.WatchTrainingJobRequest(name=name, from_sequence=from_sequence)
        return self._stream(self.stub.WatchTrainingJob, request, team, timeout_s)

    async def estimate(
        self, spec: pb.TrainingJobSpec, team: str | None = None
    ) -> pb.EstimateResourcesResponse:
        request = pb.EstimateResourcesRequest(spec=spec)
        return await self._call(self.stub.EstimateResources, request, team)
