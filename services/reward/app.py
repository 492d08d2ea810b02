"""Wiring of the reward service: its servicer mounted on the shared server bootstrap."""

from __future__ import annotations

from services.common.server import ServiceBinding
from services.reward.settings import RewardSettings
from tlm.reward.v1 import reward_service_pb2, reward_service_pb2_grpc

SERVICE_NAME = reward_service_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


class RewardServiceServicer(reward_service_pb2_grpc.RewardServiceServicer):
    """Every RPC answers UNIMPLEMENTED until the reward issue lands."""


def binding(settings: RewardSettings) -> ServiceBinding:
    servicer = RewardServiceServicer()  # type: ignore[abstract]  # stubs until implemented
    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: reward_service_pb2_grpc.add_RewardServiceServicer_to_server(
            servicer, server
        ),
    )
