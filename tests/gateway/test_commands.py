"""`tlm up --http-port` and `tlm serve gateway` as users run them, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.waiting import wait_for

TLM = [sys.executable, "-m", "services.cli.main"]


def get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    return stderr


def test_up_serves_the_gateway_and_serve_gateway_alone(tmp_path: Path) -> None:
    ready = tmp_path / "addr"
    env = {**os.environ, "TLM_LOG_JSON": "true"}
    up = subprocess.Popen(
        [
            *TLM,
            "up",
            "--port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(tmp_path / "d"),
            "--ready-file",
            str(ready),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: ready.exists() or up.poll() is not None, timeout=120, what="tlm up")
        assert up.stderr is not None and up.poll() is None
        # The gateway starts before the ready file is written, so its line is already there.
        url = ""
        while not url:
            event = json.loads(up.stderr.readline())
            url = event["url"] if event["event"] == "gateway_started" else ""
        assert get(f"{url}/v1/models") == {"object": "list", "data": []}  # keyless: team dev

        alone_ready = tmp_path / "gw"
        gateway = subprocess.Popen(
            [
                *TLM,
                "serve",
                "gateway",
                "--port",
                "0",
                "--insecure-dev",
                "--ready-file",
                str(alone_ready),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "TLM_GATEWAY_DEPLOY_ADDRESS": ready.read_text()},
        )
        try:
            wait_for(alone_ready.exists, timeout=60, what="tlm serve gateway")
            alone = alone_ready.read_text()
            assert get(f"{alone}/health") == {"status": "SERVING"}
            assert get(f"{alone}/v1/models")["data"] == []
        finally:
            assert "gateway_stopped" in stop(gateway)
    finally:
        assert "server_stopped" in stop(up)
