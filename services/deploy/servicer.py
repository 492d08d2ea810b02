"""The DeploymentService servicer: convert, call the core, convert back. Nothing else."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from services.common.auth import current_team
from services.deploy import convert
from services.deploy.core import DeployCore
from tlm.deploy.v1 import deploy_pb2 as pb
from tlm.deploy.v1 import deploy_pb2_grpc


class DeploymentServicer(deploy_pb2_grpc.DeploymentServiceServicer):
    """`core` is called for the core: the app builds it once the server knows its address."""

    def __init__(self, core: Callable[[], DeployCore], pool: str) -> None:
        self._core = core
        self.pool = pool

    @property
    def core(self) -> DeployCore:
        return self._core()

    def _out(self, d) -> pb.Deployment:  # type: ignore[no-untyped-def]
        return convert.deployment_to_proto(d, self.pool)

    async def CreateDeployment(
        self, request: pb.CreateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Deployment:
        spec = convert.spec_from_proto(request.deployment)
        d = await self.core.create(current_team(), request.deployment_id, spec, request.request_id)
        return self._out(d)

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Deployment:
        return self._out(await self.core.get(current_team(), request.name))

    async def ListDeployments(
        self, request: pb.ListDeploymentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeploymentsResponse:
        page = await self.core.list_page(current_team(), request.page_size, request.page_token)
        return pb.ListDeploymentsResponse(
            deployments=[self._out(d) for d in page.deployments],
            next_page_token=page.next_token,
        )

    async def UpdateDeployment(
        self, request: pb.UpdateDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Deployment:
        d = await self.core.update(
            current_team(),
            request.deployment.name,
            convert.spec_from_proto(request.deployment),
            list(request.update_mask.paths),
            request.deployment.etag,
        )
        return self._out(d)

    async def DeleteDeployment(
        self, request: pb.DeleteDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDeploymentResponse:
        await self.core.delete(current_team(), request.name)
        return pb.DeleteDeploymentResponse()

    async def RollbackDeployment(
        self, request: pb.RollbackDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackDeploymentResponse:
        d = await self.core.rollback(current_team(), request.name)
        return pb.RollbackDeploymentResponse(deployment=self._out(d))

    async def RefreshDeployment(
        self, request: pb.RefreshDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshDeploymentResponse:
        d, rolled = await self.core.refresh(current_team(), request.name)
        return pb.RefreshDeploymentResponse(deployment=self._out(d), rolled=rolled)
