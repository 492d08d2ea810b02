"""`tlm` in a subprocess, as users run it: a server command started until its ready file holds
the address, `tlm up`'s gateway URL read from its JSON log, and a graceful stop (SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.waiting import wait_for

TLM = [sys.executable, "-m", "services.cli.main"]


def json_log_env(**extra: str) -> dict[str, str]:
    """This environment, with JSON log lines on stderr and `extra` variables."""
    return {**os.environ, "TLM_LOG_JSON": "true", **extra}


def start(
    *args: str, ready: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.Popen[str]:
    """`tlm ARGS --ready-file READY`, returned once it has written READY (the address)."""
    proc = subprocess.Popen(
        [*TLM, *args, "--ready-file", str(ready)],
        stderr=subprocess.PIPE,
        text=True,
        env=env or json_log_env(),
    )
    wait_for(lambda: ready.exists() or proc.poll() is not None, timeout, f"tlm {args[0]}")
    if proc.poll() is not None:
        raise AssertionError(f"tlm {' '.join(args)} exited: {proc.communicate()[1]}")
    return proc


def gateway_url(up: subprocess.Popen[str]) -> str:
    """The URL of `tlm up --http-port`'s gateway: it starts before the ready file is written,
    so its log line is already there."""
    assert up.stderr is not None
    while True:
        event = json.loads(up.stderr.readline())
        if event["event"] == "gateway_started":
            return str(event["url"])


def stop(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """SIGTERM; the process must exit 0. Its stderr from then on."""
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr
    return stderr
