"""`tlm up --http-port` serves the console beside the OpenAI endpoint, and `tlm serve console`
serves it alone against a `tlm up` server, as users run them, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

from tests.gateway.test_commands import TLM, stop
from tests.waiting import wait_for


def page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200
        return response.read().decode()


def test_up_and_serve_console(tmp_path: Path) -> None:
    ready = tmp_path / "addr"
    env = {**os.environ, "TLM_LOG_JSON": "true"}
    up_args = ["up", "--port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "d")]
    up = subprocess.Popen(
        [*TLM, *up_args, "--ready-file", str(ready)], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        wait_for(lambda: ready.exists() or up.poll() is not None, timeout=120, what="tlm up")
        assert up.stderr is not None and up.poll() is None
        url = ""
        while not url:
            event = json.loads(up.stderr.readline())
            url = event["url"] if event["event"] == "gateway_started" else ""
        # Keyless `tlm up` (team dev): the pages answer without signing in.
        assert "Create a training job" in page(f"{url}/console/jobs/new")

        alone_ready = tmp_path / "console"
        args = ["serve", "console", "--port", "0", "--insecure-dev"]
        console = subprocess.Popen(
            [*TLM, *args, "--ready-file", str(alone_ready)],
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "TLM_ADDRESS": ready.read_text()},
        )
        try:
            wait_for(alone_ready.exists, timeout=60, what="tlm serve console")
            alone = alone_ready.read_text()  # the console's URL, ending in /console/
            assert "Model square" in page(alone)  # / -> /console/models
            assert "prompt datasets" in page(f"{alone}datasets")
        finally:
            stop(console)
    finally:
        assert "server_stopped" in stop(up)
