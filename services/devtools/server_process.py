"""One service in its own process, as deployed (`tlm serve <service>`), for benchmarks: the
client and the server share no GIL. Started until its ready file holds the address (its stderr
in the folder given); stopped by SIGTERM. `tree` lists a process and its descendants (a reward
service's rule workers)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def start_service(
    service: str, folder: Path, env: dict[str, str], timeout: float = 120
) -> tuple[subprocess.Popen[bytes], str]:
    """`tlm serve SERVICE --port 0 --insecure-dev` with `env` added (its TLM_<SERVICE>_...
    settings), its files under `folder`; returns the process and the address it serves on."""
    folder.mkdir(parents=True, exist_ok=True)
    ready, log = folder / "address", folder / "stderr"
    cli = [sys.executable, "-m", "services.cli.main", "serve", service]
    # Warnings only: an info line per call (the rpc event) is CPU the benchmark would count.
    quiet = {f"TLM_{service.upper()}_LOG_LEVEL": "warning"}
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [*cli, "--port", "0", "--insecure-dev", "--ready-file", str(ready)],
            env={**os.environ, **quiet, **env},
            stderr=stderr,
        )
    end = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the {service} service did not start:\n{tail}")
        time.sleep(0.1)
    return proc, ready.read_text()


def stop_service(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def tree(pid: int) -> list[int]:
    """`pid` and every process under it (Linux /proc; just `pid` elsewhere)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(p) for p in children.read_text().split()]
    return pids
