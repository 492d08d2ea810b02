"""Wiring of the trainer service: its servicer mounted on the shared server bootstrap."""

from __future__ import annotations

from services.common.server import ServiceBinding
from services.trainer.settings import TrainerSettings
from tlm.trainer.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerServiceServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Every RPC answers UNIMPLEMENTED until the trainer issue lands."""


def binding(settings: TrainerSettings) -> ServiceBinding:
    servicer = TrainerServiceServicer()  # type: ignore[abstract]  # stubs until implemented
    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            servicer, server
        ),
    )
