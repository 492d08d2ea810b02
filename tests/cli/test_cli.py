"""The `tlm` command line as users run it: `tlm up` in a subprocess, `tlm health`, shutdown."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.tlm_process import TLM, start, stop


@pytest.mark.slow  # starts `tlm up`: every service, the rule pool
def test_up_health_and_graceful_stop(tmp_path: Path) -> None:
    ready = tmp_path / "addr"
    proc = start("up", "--port", "0", "--data-dir", str(tmp_path / "data"), ready=ready)
    try:
        out = subprocess.run(
            [*TLM, "health", "--address", ready.read_text(), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        stderr = stop(proc)
    assert out.returncode == 0, out.stderr
    assert {r["status"] for r in json.loads(out.stdout).values()} == {"SERVING"}
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "insecure_dev_mode" in events and events[-1] == "server_stopped"
    assert events.count("rpc") == 5  # one line per health check


def test_health_fails_when_nothing_listens() -> None:
    out = subprocess.run(
        [*TLM, "health", "--address", "127.0.0.1:1", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    # At once (no wait for the port to open), with the address tried; see tests/cli/test_errors.py.
    assert {r["status"] for r in json.loads(out.stdout).values()} == {"UNAVAILABLE"}
    assert out.stderr.startswith(
        "error: cannot reach the registry, reward, rollout, trainer and deploy"
    )


def test_serve_without_keys_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLM_")}
    out = subprocess.run(
        [*TLM, "serve", "registry", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode != 0 and "no API keys configured" in out.stderr


@pytest.mark.slow  # builds a model in a subprocess (~10 s)
def test_tiny_model_command(tmp_path: Path) -> None:
    out = subprocess.run(
        [*TLM, "dev", "tiny-model", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "config.json").exists()
    bad = subprocess.run(
        [*TLM, "dev", "tiny-model", str(tmp_path / "n"), "--size", "huge"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "huge" in bad.stderr
