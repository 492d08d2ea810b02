"""Wiring of the rollout service: its servicer mounted on the shared server bootstrap."""

from __future__ import annotations

from services.common.server import ServiceBinding
from services.rollout.settings import RolloutSettings
from tlm.rollout.v1 import rollout_pb2, rollout_pb2_grpc

SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name


class RolloutServiceServicer(rollout_pb2_grpc.RolloutServiceServicer):
    """Every RPC answers UNIMPLEMENTED until the rollout issue lands."""


def binding(settings: RolloutSettings) -> ServiceBinding:
    servicer = RolloutServiceServicer()  # type: ignore[abstract]  # stubs until implemented
    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(
            servicer, server
        ),
    )
