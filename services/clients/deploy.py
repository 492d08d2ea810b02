"""The deploy service's client: deployments (create, read, list, update, delete, rollback,
refresh). The gateway and `tlm deployments` use it."""

from __future__ import annotations

from google.protobuf import field_mask_pb2

from services.clients.base import ServiceClient
from services.common.pagination import MAX_PAGE_SIZE
from tlm.deploy.v1 import deploy_pb2 as pb
from tlm.deploy.v1 import deploy_pb2_grpc

PAGE_SIZE = MAX_PAGE_SIZE  # per List call; the lists follow next_page_token to the end


class DeployClient(ServiceClient):
    """Async client of the DeploymentService."""

    service = "deploy"
    descriptor = pb.DESCRIPTOR
    stub_class = deploy_pb2_grpc.DeploymentServiceStub

    async def create_deployment(
        self,
        deployment_id: str,
        deployment: pb.Deployment,
        request_id: str = "",
        team: str | None = None,
    ) -> pb.Deployment:
        request = pb.CreateDeploymentRequest(
            deployment_id=deployment_id, deployment=deployment, request_id=request_id
        )
        return await self._call(self.stub.CreateDeployment, request, team)

    async def get_deployment(self, name: str, team: str | None = None) -> pb.Deployment:
        request = pb.GetDeploymentRequest(name=name)
        return await self._call(self.stub.GetDeployment, request, team)

    async def list_deployments(self, team: str | None = None) -> list[pb.Deployment]:
        """Every deployment of the team, page after page."""
        request = pb.ListDeploymentsRequest(page_size=PAGE_SIZE)
        return await self._every_page(self.stub.ListDeployments, request, "deployments", team)

    async def update_deployment(
        self, deployment: pb.Deployment, paths: list[str], team: str | None = None
    ) -> pb.Deployment:
        request = pb.UpdateDeploymentRequest(
            deployment=deployment, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return await self._call(self.stub.UpdateDeployment, request, team)

    async def delete_deployment(self, name: str, team: str | None = None) -> None:
        await self._call(self.stub.DeleteDeployment, pb.DeleteDeploymentRequest(name=name), team)

    async def rollback_deployment(self, name: str, team: str | None = None) -> pb.Deployment:
        request = pb.RollbackDeploymentRequest(name=name)
        return (await self._call(self.stub.RollbackDeployment, request, team)).deployment

    async def refresh_deployment(
        self, name: str, team: str | None = None
    ) -> pb.RefreshDeploymentResponse:
        request = pb.RefreshDeploymentRequest(name=name)
        return await self._call(self.stub.RefreshDeployment, request, team)
