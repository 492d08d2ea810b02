"""`tlm up --http-port` and `tlm serve gateway` as users run them, in subprocesses."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.tlm_process import gateway_url, json_log_env, start, stop

# Each starts `tlm up` (every service, the rule pool) in a subprocess: seconds.
pytestmark = pytest.mark.slow


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_up_serves_the_gateway_and_serve_gateway_alone(tmp_path: Path) -> None:
    ready = tmp_path / "addr"
    up_args = ["up", "--port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "d")]
    up = start(*up_args, ready=ready)
    try:
        url = gateway_url(up)
        assert get(f"{url}/v1/models") == {"object": "list", "data": []}  # keyless: team dev

        alone_ready = tmp_path / "gw"
        env = json_log_env(TLM_GATEWAY_DEPLOY_ADDRESS=ready.read_text())
        alone_args = ["serve", "gateway", "--port", "0", "--insecure-dev"]
        gateway = start(*alone_args, ready=alone_ready, env=env)
        try:
            alone = alone_ready.read_text()
            assert get(f"{alone}/health") == {"status": "SERVING"}
            assert get(f"{alone}/v1/models")["data"] == []
        finally:
            assert "gateway_stopped" in stop(gateway)
    finally:
        assert "server_stopped" in stop(up)
