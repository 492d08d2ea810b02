"""Node.js clients (@grpc/grpc-js) read health, list the services by reflection, and call Score
from `protos/` alone (@grpc/proto-loader, no other include path), decoding the google.rpc error
details: proof that clients in other languages need nothing but the protos and a standard gRPC
library."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from services.devtools.server_thread import ServerThread
from tests.reward.conftest import start_reward

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


def test_node_loads_protos_alone_and_decodes_bad_request(node: str, tmp_path: Path) -> None:
    """proto-loader compiles every tlm proto (trainer.proto imports google/rpc/status.proto) with
    includeDirs [protos/] only; a Score with a look-behind regex (refused by RE2) comes back
    INVALID_ARGUMENT with a BadRequest whose field violation is the spec path, decoded in Node
    from grpc-status-details-bin (google.rpc.Status -> Any -> BadRequest)."""
    server = start_reward(tmp_path)
    try:
        proc = subprocess.run(
            [node, "score_bad_request.mjs", server.address],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.stop()
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tlm/trainer/v1/trainer.proto" in out["loaded"]
    assert out["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v["field"] for v in out["field_violations"]] == ["scorers[0].regex.pattern"]
    assert out["field_violations"][0]["description"]
    assert out["reasons"] == ["EVALUATOR_INVALID"]
