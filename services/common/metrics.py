"""Prometheus metrics shared by every service, served on an HTTP port when configured."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RPC_TOTAL = Counter("tlm_rpc_total", "RPCs handled", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "tlm_rpc_latency_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 600),
)


def split_method(full_method: str) -> tuple[str, str]:
    """'/tlm.registry.v1.RegistryService/Get' -> ('tlm.registry.v1.RegistryService', 'Get')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def start_metrics_server(port: int) -> int:
    """Serve /metrics on `port` (0 picks one); returns the bound port."""
    server, _thread = start_http_server(port)
    return int(server.server_port)
