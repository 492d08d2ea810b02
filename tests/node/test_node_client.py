"""A Node.js client (@grpc/grpc-js) reads health and lists the services by reflection: proof
that clients in other languages need nothing but the protos and a standard gRPC library."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from services.devtools.server_thread import ServerThread

NODE_DIR = Path(__file__).parent
TLM_SERVICES = [
    "tlm.registry.v1.RegistryService",
    "tlm.reward.v1.RewardService",
    "tlm.rollout.v1.RolloutService",
    "tlm.trainer.v1.TrainerService",
]


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is required for the cross-language test (make test installs it)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)
    return node


def _probe(node: str, address: str, *extra: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    args = [node, "probe.mjs", address, *(x for s in TLM_SERVICES for x in ("--service", s))]
    proc = subprocess.run([*args, *extra], cwd=NODE_DIR, capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_node_client_reads_health_and_reflection(node: str, embedded: ServerThread) -> None:
    rc, out = _probe(node, embedded.address)
    assert rc == 0, out
    assert out["health"] == {"": "SERVING", **{s: "SERVING" for s in TLM_SERVICES}}
    assert set(TLM_SERVICES) <= set(out["services"])
    # Reflection served each service's descriptor (and its imports) to the Node client.
    assert all(out["descriptors"][s] > 1000 for s in TLM_SERVICES)


def test_node_client_with_api_key(node: str, secured: ServerThread) -> None:
    rc, out = _probe(node, secured.address, "--api-key", "key-team-a")
    assert rc == 0 and set(TLM_SERVICES) <= set(out["services"])
