"""Wiring of the registry: settings -> metadata store (migrated) + blob store -> servicer."""

from __future__ import annotations

from services.clients.artifacts import keep_transfer_buffers
from services.common.server import ServiceBinding
from services.registry.blobs import open_blob_store
from services.registry.core import Registry
from services.registry.servicer import RegistryServicer
from services.registry.settings import RegistrySettings
from services.registry.store import MetadataStore
from services.specs.evaluator import EvaluatorInvalid, validate_json
from tlm.registry.v1 import registry_pb2, registry_pb2_grpc
from tlm.reward.v1 import evaluator_pb2

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


def validate_evaluator_json(spec_json: str) -> evaluator_pb2.EvaluatorSpec:
    """The shared spec validation (`services/specs`, as the reward service runs it): every error
    with its JSON path, and the normalised spec (defaults filled in) that the registry stores."""
    result = validate_json(spec_json)
    if result.normalized is None:
        raise EvaluatorInvalid(result.errors)
    return result.normalized


def build_registry(settings: RegistrySettings) -> Registry:
    data_dir = settings.data_dir.expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.database_url or f"sqlite:///{data_dir / 'registry.db'}"
    store = MetadataStore(url)
    store.migrate()
    blobs = open_blob_store(
        settings.blob_url or str(data_dir / "blobs"),
        staging=data_dir / "staging",
        endpoint_url=settings.s3_endpoint_url,
    )
    return Registry(
        store,
        blobs,
        max_row_bytes=settings.max_row_bytes,
        max_row_errors=settings.max_row_errors,
        validate_spec=validate_evaluator_json,
    )


def binding(settings: RegistrySettings) -> ServiceBinding:
    keep_transfer_buffers()  # uploads and downloads reuse their chunk buffers' pages
    registry = build_registry(settings)
    servicer = RegistryServicer(registry)

    async def stop() -> None:
        registry.store.close()
        registry.blobs.close()  # lets the next start on this folder clean what we left

    return ServiceBinding(
        name=SERVICE_NAME,
        register=lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(
            servicer, server
        ),
        on_stop=stop,
    )
