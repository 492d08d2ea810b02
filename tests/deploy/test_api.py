"""DeploymentService (services/deploy/) on a real server with a real registry and rollout
service and the tiny model: create, alias move rolls, rollback, update, delete, errors.

(The other files of tests/deploy/ check the deploy/ folder's manifests.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from services.common.settings import ServerSettings
from services.deploy import app as deploy_app
from services.deploy.settings import DeploySettings
from services.devtools.server_thread import ServerThread
from services.registry import app as registry_app
from services.registry.settings import RegistrySettings
from services.rollout import app as rollout_app
from services.rollout.settings import RolloutSettings
from tests.rpc_details import rpc_details
from tests.waiting import wait_for
from tlm.deploy.v1 import deploy_pb2 as pb
from tlm.deploy.v1 import deploy_pb2_grpc
from tlm.registry.v1 import registry_pb2, registry_pb2_grpc

READY = pb.Deployment.STATE_READY


def start_serving_stack(data_dir: Path, refresh_interval_s: float = 0.0) -> ServerThread:
    """Registry, rollout and deploy in one server; no periodic refresh unless asked."""
    common = {"host": "127.0.0.1", "port": 0, "data_dir": data_dir, "insecure_dev": True}
    settings = ServerSettings(**common)  # type: ignore[arg-type]

    def bindings():  # type: ignore[no-untyped-def]
        return [
            registry_app.binding(RegistrySettings(**common)),  # type: ignore[arg-type]
            rollout_app.binding(RolloutSettings(**common)),  # type: ignore[arg-type]
            deploy_app.binding(
                DeploySettings(**common, refresh_interval_s=refresh_interval_s)  # type: ignore[arg-type]
            ),
        ]

    return ServerThread(bindings, settings).start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = start_serving_stack(tmp_path_factory.mktemp("deploy"))
    yield server
    server.stop()


def upload(address: str, model: str, folder: Path, count: int) -> list[str]:
    import asyncio

    from services.clients.registry import RegistryClient

    async def main() -> list[str]:
        async with RegistryClient(address, insecure=True) as registry:
            await registry.create_model(model, exist_ok=True)
            return [
                (await registry.upload_model_revision(f"models/{model}", folder)).name
                for _ in range(count)
            ]

    return asyncio.run(main())


def registry(address: str) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(address))


def deploy(address: str) -> deploy_pb2_grpc.DeploymentServiceStub:
    return deploy_pb2_grpc.DeploymentServiceStub(grpc.insecure_channel(address))


def set_alias(address: str, model: str, alias: str, revision: str) -> None:
    registry(address).SetModelAlias(
        registry_pb2.SetModelAliasRequest(
            name=f"models/{model}", alias=alias, revision_id=revision.rsplit("/", 1)[1]
        ),
        timeout=30,
    )


def ready(stub: deploy_pb2_grpc.DeploymentServiceStub, name: str, revision: str) -> pb.Deployment:
    """Wait until the deployment serves `revision` and is READY."""
    box: list[pb.Deployment] = []

    def check() -> bool:
        d = stub.GetDeployment(pb.GetDeploymentRequest(name=name), timeout=30)
        box[:] = [d]
        return d.state == READY and d.model_revision == revision

    wait_for(check, timeout=120, what=f"{name} READY on {revision}")
    return box[0]


def test_create_alias_move_rollback_delete(stack: ServerThread, tiny_model_dir: Path) -> None:
    r1, r2 = upload(stack.address, "dm", tiny_model_dir, 2)
    set_alias(stack.address, "dm", "prod", r1)
    stub = deploy(stack.address)
    created = stub.CreateDeployment(
        pb.CreateDeploymentRequest(
            deployment_id="chat",
            deployment=pb.Deployment(
                model="models/dm/revisions/prod",
                sampling_defaults=pb.SamplingDefaults(temperature=0.0, max_tokens=4),
            ),
        ),
        timeout=30,
    )
    assert created.name == "deployments/chat" and created.pool == "serving"
    assert created.pending_model_revision == r1 and created.model_revision == ""
    d = ready(stub, "deployments/chat", r1)
    assert d.previous_model_revision == "" and d.pending_model_revision == ""
    assert d.sampling_defaults.max_tokens == 4 and d.replicas == 1

    # The alias moves: a refresh rolls the deployment; r1 becomes the rollback target.
    set_alias(stack.address, "dm", "prod", r2)
    refreshed = stub.RefreshDeployment(pb.RefreshDeploymentRequest(name=d.name), timeout=30)
    assert refreshed.rolled and refreshed.deployment.pending_model_revision == r2
    d = ready(stub, d.name, r2)
    assert d.previous_model_revision == r1 and d.model == "models/dm/revisions/prod"
    again = stub.RefreshDeployment(pb.RefreshDeploymentRequest(name=d.name), timeout=30)
    assert not again.rolled

    # Rollback: r1 serves again, pinned (a refresh no longer follows the alias), r2 is the target.
    stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=d.name), timeout=30)
    d = ready(stub, d.name, r1)
    assert d.previous_model_revision == r2 and d.model == r1
    assert not stub.RefreshDeployment(pb.RefreshDeploymentRequest(name=d.name), timeout=30).rolled

    # Update back to the alias: it follows prod (r2) again.
    mask = field_mask_pb2.FieldMask(paths=["model"])
    update = pb.Deployment(name=d.name, model="models/dm/revisions/prod", etag=d.etag)
    stub.UpdateDeployment(pb.UpdateDeploymentRequest(deployment=update, update_mask=mask))
    d = ready(stub, d.name, r2)
    assert d.previous_model_revision == r1

    listed = stub.ListDeployments(pb.ListDeploymentsRequest(), timeout=30)
    assert [x.name for x in listed.deployments] == ["deployments/chat"]
    stub.DeleteDeployment(pb.DeleteDeploymentRequest(name=d.name), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetDeployment(pb.GetDeploymentRequest(name=d.name), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_periodic_refresh_follows_the_alias(tmp_path: Path, tiny_model_dir: Path) -> None:
    server = start_serving_stack(tmp_path, refresh_interval_s=0.2)
    try:
        r1, r2 = upload(server.address, "pm", tiny_model_dir, 2)
        set_alias(server.address, "pm", "prod", r1)
        stub = deploy(server.address)
        stub.CreateDeployment(
            pb.CreateDeploymentRequest(
                deployment_id="p", deployment=pb.Deployment(model="models/pm/revisions/prod")
            ),
            timeout=30,
        )
        ready(stub, "deployments/p", r1)
        set_alias(server.address, "pm", "prod", r2)
        assert ready(stub, "deployments/p", r2).previous_model_revision == r1
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (
            pb.CreateDeploymentRequest(deployment_id="x", deployment=pb.Deployment()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "deployment.model",
        ),
        (
            pb.CreateDeploymentRequest(
                deployment_id="Bad/Id", deployment=pb.Deployment(model="models/dm/revisions/r1")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "deployment_id",
        ),
        (
            pb.CreateDeploymentRequest(
                deployment_id="x", deployment=pb.Deployment(model="models/nope/revisions/r1")
            ),
            grpc.StatusCode.NOT_FOUND,
            "deployment.model",
        ),
        (
            pb.CreateDeploymentRequest(
                deployment_id="x",
                deployment=pb.Deployment(model="models/dm/revisions/r1", replicas=65),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "deployment.replicas",
        ),
        (
            pb.CreateDeploymentRequest(
                deployment_id="x",
                deployment=pb.Deployment(
                    model="models/dm/revisions/r1",
                    sampling_defaults=pb.SamplingDefaults(top_p=0.0),
                ),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "deployment.sampling_defaults.top_p",
        ),
    ],
)
def test_create_refuses_naming_the_field(
    stack: ServerThread, request_: pb.CreateDeploymentRequest, code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        deploy(stack.address).CreateDeployment(request_, timeout=30)
    assert err.value.code() == code
    assert field in rpc_details(err.value).fields


def test_rollback_without_previous_and_bad_update_mask(
    stack: ServerThread, tiny_model_dir: Path
) -> None:
    (r1,) = upload(stack.address, "dm2", tiny_model_dir, 1)
    stub = deploy(stack.address)
    request = pb.CreateDeploymentRequest(
        deployment_id="once", deployment=pb.Deployment(model=r1), request_id="req-1"
    )
    first = stub.CreateDeployment(request, timeout=30)
    assert stub.CreateDeployment(request, timeout=30).create_time == first.create_time
    with pytest.raises(grpc.RpcError) as err:
        stub.RollbackDeployment(pb.RollbackDeploymentRequest(name=first.name), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(name=first.name),
                update_mask=field_mask_pb2.FieldMask(paths=["model_revision"]),
            ),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_details(err.value).fields == ["update_mask"]
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateDeployment(
            pb.UpdateDeploymentRequest(
                deployment=pb.Deployment(name=first.name, replicas=2, etag='W/"999"'),
                update_mask=field_mask_pb2.FieldMask(paths=["replicas"]),
            ),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.ABORTED
