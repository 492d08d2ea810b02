"""`tlm up --http-port` serves the console beside the OpenAI endpoint, and `tlm serve console`
serves it alone against a `tlm up` server, as users run them, in subprocesses."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from tests.tlm_process import gateway_url, json_log_env, start, stop

# Each starts `tlm up` (every service, the rule pool) in a subprocess: seconds.
pytestmark = pytest.mark.slow


def page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200
        return response.read().decode()


def test_up_and_serve_console(tmp_path: Path) -> None:
    ready = tmp_path / "addr"
    up_args = ["up", "--port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "d")]
    up = start(*up_args, ready=ready)
    try:
        url = gateway_url(up)
        # Keyless `tlm up` (team dev): the pages answer without signing in.
        assert "Create a training job" in page(f"{url}/console/jobs/new")

        alone_ready = tmp_path / "console"
        env = json_log_env(TLM_ADDRESS=ready.read_text())
        alone_args = ["serve", "console", "--port", "0", "--insecure-dev"]
        console = start(*alone_args, ready=alone_ready, env=env)
        try:
            alone = alone_ready.read_text()  # the console's URL, ending in /console/
            assert "Model square" in page(alone)  # / -> /console/models
            assert "prompt datasets" in page(f"{alone}datasets")
        finally:
            stop(console)
    finally:
        assert "server_stopped" in stop(up)
