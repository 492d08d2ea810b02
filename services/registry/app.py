"""Wiring of the registry service: its servicer mounted on the shared server bootstrap."""

from __future__ import annotations

from tlm.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.server import ServiceBinding
from services.registry.settings import RegistrySettings

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


class RegistryServiceServicer(registry_pb2_grpc.RegistryServiceServicer):
    """Every RPC answers UNIMPLEMENTED until the registry issue lands."""


def binding(settings: RegistrySettings) -> ServiceBinding:
    servicer = RegistryServiceServicer()  # type: ignore[abstract]  # stubs until implemented
    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(
            servicer, server
        ),
    )
