"""Generated tokens/s through the OpenAI-compatible gateway (the official `openai` client ->
HTTP -> deploy + rollout over gRPC) vs plain in-process `model.generate`.

The workload of bench/rollout_throughput.py: 32 prompts x n=4 x 48 new tokens on the
~3.5M-parameter tiny model ("bench"), temperature 1, no top-k/top-p, one /v1/completions call.
Both sides interleaved, `--repeats` rounds; prints the median and spread of each rate and of
the per-round ratio (target >= 0.85).

    .venv/bin/python bench/gateway_throughput.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import openai
import torch
from rollout_throughput import NEW_TOKENS, Peer, interleaved, prompts, spread

from services.clients.registry import RegistryClient
from services.common.logs import configure_logging
from services.common.settings import ServerSettings
from services.deploy import app as deploy_app
from services.deploy.settings import DeploySettings
from services.devtools.gateway_thread import GatewayThread
from services.devtools.server_thread import ServerThread
from services.devtools.tiny_models import cached_tiny_model
from services.gateway.settings import GatewaySettings
from services.registry import app as registry_app
from services.registry.settings import RegistrySettings
from services.rollout import app as rollout_app
from services.rollout.settings import RolloutSettings
from tlm.deploy.v1 import deploy_pb2 as pb
from tlm.deploy.v1 import deploy_pb2_grpc

PROMPTS, N = 32, 4  # rollout_throughput's (32, 4) shape


def start_stack(data_dir: Path, folder: Path) -> ServerThread:
    """Registry, rollout and deploy in one server, the bench model deployed as `bench`."""
    common = {"host": "127.0.0.1", "port": 0, "data_dir": data_dir, "insecure_dev": True}
    server = ServerThread(
        lambda: [
            registry_app.binding(RegistrySettings(**common)),  # type: ignore[arg-type]
            rollout_app.binding(RolloutSettings(**common)),  # type: ignore[arg-type]
            deploy_app.binding(DeploySettings(**common, refresh_interval_s=0)),  # type: ignore[arg-type]
        ],
        ServerSettings(**common),  # type: ignore[arg-type]
    ).start()

    async def push() -> str:
        async with RegistryClient(server.address, insecure=True) as registry:
            await registry.create_model("bench", exist_ok=True)
            return (await registry.upload_model_revision("models/bench", folder)).name

    revision = asyncio.run(push())
    stub = deploy_pb2_grpc.DeploymentServiceStub(grpc.insecure_channel(server.address))
    request = pb.CreateDeploymentRequest(
        deployment_id="bench", deployment=pb.Deployment(model=revision)
    )
    stub.CreateDeployment(request)
    get = pb.GetDeploymentRequest(name="deployments/bench")
    deadline = time.monotonic() + 300
    while stub.GetDeployment(get).state != pb.Deployment.STATE_READY:
        assert time.monotonic() < deadline, "the deployment never became READY"
        time.sleep(0.1)
    return server


def gateway_rate(client: openai.OpenAI, seed: int) -> float:
    start = time.perf_counter()
    answer = client.completions.create(
        model="bench",
        prompt=prompts(PROMPTS),
        n=N,
        temperature=1.0,
        top_p=1.0,
        max_tokens=NEW_TOKENS,
        seed=seed,
    )
    elapsed = time.perf_counter() - start
    assert answer.usage is not None
    return answer.usage.completion_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    configure_logging(json=True, level="warning")
    folder = cached_tiny_model("bench")
    peer = Peer(str(folder))
    with tempfile.TemporaryDirectory() as tmp:
        server = start_stack(Path(tmp), folder)
        settings = GatewaySettings(host="127.0.0.1", port=0, insecure_dev=True)
        gateway = GatewayThread(settings, server.address).start()
        try:
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="bench", max_retries=0)
            seeds = itertools.count(1)
            # Interleaved (alternating which goes first), so load on the machine hits both.
            service, local = interleaved(
                (lambda: gateway_rate(client, next(seeds)), lambda: peer.rate(PROMPTS, N)),
                args.repeats,
            )
        finally:
            gateway.stop()
            server.stop()
    ratios = [a / b for a, b in zip(service, local, strict=True)]
    print(f"workload: {PROMPTS} prompts x n={N} x {NEW_TOKENS} new tokens, tiny 'bench' model, CPU")
    print(f"torch threads: {torch.get_num_threads()}; tokens/s, median [min-max] of {args.repeats}")
    print(f"gateway (openai client, HTTP): {spread(service)}")
    print(f"in-process model.generate:     {spread(local)}")
    print(
        f"ratio gateway / generate: {statistics.median(ratios):.2f} "
        f"[{min(ratios):.2f}-{max(ratios):.2f}] per round (target >= 0.85)"
    )


if __name__ == "__main__":
    main()
