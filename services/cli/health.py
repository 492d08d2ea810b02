"""Health probing for `tlm health`."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.client import call_metadata, sync_channel
from tlm.deploy.v1 import deploy_pb2
from tlm.registry.v1 import registry_pb2
from tlm.reward.v1 import reward_service_pb2
from tlm.rollout.v1 import rollout_pb2
from tlm.trainer.v1 import trainer_pb2

SERVICE_NAMES = {
    "registry": registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    "reward": reward_service_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
    "rollout": rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
    "trainer": trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
    "deploy": deploy_pb2.DESCRIPTOR.services_by_name["DeploymentService"].full_name,
}


def check_health(service: str, address: str, timeout: float) -> dict[str, str]:
    """{'address', 'status'}: SERVING, NOT_SERVING, UNKNOWN, or the gRPC error code name."""
    with sync_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAMES[service]),
                timeout=timeout,
                # A closed port or an unknown host fails at once (UNAVAILABLE), not at timeout.
                wait_for_ready=False,
                metadata=call_metadata(),
            )
        except grpc.RpcError as exc:
            return {"address": address, "status": exc.code().name}
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return {"address": address, "status": status}
