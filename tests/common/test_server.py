"""The shared server bootstrap on a real server: health, reflection, auth, errors, logs."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from services.devtools.server_thread import ServerThread
from tests.rpc_details import rpc_details
from tlm.trainer.v1 import trainer_pb2, trainer_pb2_grpc

TLM_SERVICES = {
    "tlm.registry.v1.RegistryService",
    "tlm.reward.v1.RewardService",
    "tlm.rollout.v1.RolloutService",
    "tlm.trainer.v1.TrainerService",
}


def test_health_reports_every_service_serving(embedded: ServerThread) -> None:
    with grpc.insecure_channel(embedded.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ["", *TLM_SERVICES]:
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="tlm.nope.v1.Nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_four_services(embedded: ServerThread) -> None:
    with grpc.insecure_channel(embedded.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in response.list_services_response.service}
    assert names >= TLM_SERVICES


def test_unauthenticated_call_is_refused_when_keys_are_configured(secured: ServerThread) -> None:
    with grpc.insecure_channel(secured.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        request = trainer_pb2.GetTrainingJobRequest(name="jobs/x")
        for metadata in [(), (("authorization", "Bearer wrong"),), (("x-api-key", ""),)]:
            with pytest.raises(grpc.RpcError) as err:
                stub.GetTrainingJob(request, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            info = _error_info(err.value)
            assert info.reason == "API_KEY_INVALID" and info.domain == "tlm.dev"
        # Health stays open for probes.
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1


def test_a_service_key_must_name_the_team(secured: ServerThread) -> None:
    with grpc.insecure_channel(secured.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        request = trainer_pb2.GetTrainingJobRequest(name="jobs/x")
        with pytest.raises(grpc.RpcError) as err:
            stub.GetTrainingJob(request, metadata=(("x-api-key", "key-service"),), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    info = rpc_details(err).error_info
    assert info is not None, "no ErrorInfo in details"
    return info


def test_one_structured_log_line_per_rpc(secured: ServerThread) -> None:
    with capture_logs() as logs, grpc.insecure_channel(secured.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.RpcError):
            trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainingJob(
                trainer_pb2.GetTrainingJobRequest(name="jobs/x"),
                metadata=(("authorization", "Bearer key-team-a"),),
                timeout=5,
            )
    lines = [e for e in logs if e["event"] == "rpc"]
    assert [line["method"] for line in lines] == [
        "/grpc.health.v1.Health/Check",
        "/tlm.trainer.v1.TrainerService/GetTrainingJob",
    ]
    trainer_line = lines[1]
    assert trainer_line["code"] == "NOT_FOUND"
    assert trainer_line["team"] == "team-a"
    assert trainer_line["latency_ms"] >= 0 and trainer_line["peer"].startswith("ipv4:127.0.0.1")


def test_prometheus_metrics_count_rpcs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import urllib.request

    from services.common.server import ServiceBinding
    from services.common.settings import ServerSettings

    settings = ServerSettings(port=0, insecure_dev=True, metrics_port=0, data_dir=tmp_path)
    noop = ServiceBinding(name="tlm.none.v1.NoneService", register=lambda server: None)
    with (
        ServerThread(lambda: [noop], settings) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert server.running is not None and server.running.metrics_port
        url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("tlm_rpc_total{") and 'method="Check"' in x and 'code="OK"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert "tlm_rpc_latency_seconds_bucket" in text
