"""The TrainerService servicer: convert, call the core, convert back. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common.auth import current_team
from services.trainer import convert
from services.trainer.core import CreateRequest, TrainerCore
from tlm.trainer.v1 import trainer_pb2 as pb
from tlm.trainer.v1 import trainer_pb2_grpc

Context = grpc.aio.ServicerContext


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    async def CreateTrainingJob(
        self, request: pb.CreateTrainingJobRequest, context: Context
    ) -> pb.TrainingJob:
        create = CreateRequest(
            spec=convert.spec_from_proto(request.spec),
            request_id=request.request_id,
            display_name=request.display_name,
            labels=dict(request.labels),
            validate_only=request.validate_only,
        )
        return convert.job_to_proto(await self.core.create(current_team(), create))

    async def GetTrainingJob(
        self, request: pb.GetTrainingJobRequest, context: Context
    ) -> pb.TrainingJob:
        job_id = convert.job_id_from_name(request.name)
        return convert.job_to_proto(self.core.get(current_team(), job_id))

    async def ListTrainingJobs(
        self, request: pb.ListTrainingJobsRequest, context: Context
    ) -> pb.ListTrainingJobsResponse:
        jobs, token = self.core.page(
            current_team(), request.page_size, request.page_token, request.state, request.method
        )
        return pb.ListTrainingJobsResponse(
            jobs=[convert.job_to_proto(j) for j in jobs], next_page_token=token
        )

    async def CancelTrainingJob(
        self, request: pb.CancelTrainingJobRequest, context: Context
    ) -> pb.TrainingJob:
        job_id = convert.job_id_from_name(request.name)
        return convert.job_to_proto(self.core.cancel(current_team(), job_id))

    async def WatchTrainingJob(
        self, request: pb.WatchTrainingJobRequest, context: Context
    ) -> AsyncIterator[pb.JobEvent]:
        job_id = convert.job_id_from_name(request.name)
        async for event in self.core.watch(current_team(), job_id, request.from_sequence):
            yield convert.event_to_proto(event)

    async def EstimateResources(
        self, request: pb.EstimateResourcesRequest, context: Context
    ) -> pb.EstimateResourcesResponse:
        spec = convert.spec_from_proto(request.spec)
        return convert.estimate_to_proto(await self.core.estimate(current_team(), spec))
