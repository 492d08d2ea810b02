"""Where a job's workers run, behind one small interface the supervisor drives: `Launcher.start`
gives `Workers`, which the supervisor polls until they exit, stops (a cancel), kills and
releases; `forget` removes what a previous trainer process left of a job it will not resume.

- `LocalLauncher`: a process on this host, `launch_command` (the worker, or torchrun's agent for
  several devices), in its own session so a signal reaches its whole group.
- `KubernetesLauncher` (`kubernetes_jobs.py`): a headless Service and an indexed Job of worker
  pods; the workers write the same events into the same job folder (a shared volume).
- `Routed`: Kubernetes for the jobs it takes (multi-node ones, or all), this host otherwise.

A cancel is the job folder's `cancel` file (`CANCEL_FILE`), written by `stop` before any signal:
a group's agent and ranks report a cancel only when it is there, so a SIGTERM from anyone else
(a Kubernetes eviction, preemption or drain) ends the workers as killed by it, and the
supervisor restarts them from the last checkpoint. The supervisor clears it before each start.

Either way the workers report through the job folder's events; an `Exit` carries what only the
launcher can know: how the workers ended, and an error when they could not say (a pod that never
started, a Job that failed before any worker reported).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.trainer.distributed import CANCEL_FILE, launch_command
from services.trainer.domain import JobError
from services.trainer.worker_protocol import LOG_FILE


@dataclass(frozen=True)
class Exit:
    """How the workers ended. `returncode`: negative when killed by that signal (the supervisor
    may restart them from the last checkpoint); `how`: the same in words ("was killed by
    SIGKILL", "pod j-1-0 was OOMKilled"); `error`: the launcher's own verdict, for an end the
    workers could not report themselves."""

    returncode: int | None
    how: str
    error: JobError | None = None


class LaunchFailed(Exception):
    """The workers could not be started (the cluster refused the Job): the job FAILS with
    `error`."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


class Workers(Protocol):
    """One start of a job's workers."""

    label: str  # for events and logs: "pid 123", "Kubernetes Job tlm/j-1"

    async def poll(self) -> Exit | None:
        """None while the workers run."""
        ...

    def stop(self) -> None:
        """Ask the workers to stop (a cancel: the job folder's `CANCEL_FILE` first, then the
        signal): they report it and exit."""
        ...

    def kill(self) -> None:
        """Stop them now."""
        ...

    async def release(self) -> None:
        """After they exited (or were killed): free what they held."""
        ...


class Launcher(Protocol):
    async def start(self, job_id: str, folder: Path, plan: dict[str, Any]) -> Workers: ...

    async def forget(self, job_id: str) -> None:
        """Remove whatever a previous trainer process left running for a job that will not be
        resumed (best effort)."""
        ...


class LocalWorkers:
    def __init__(self, proc: subprocess.Popen[bytes], folder: Path) -> None:
        self.proc, self.folder = proc, folder
        self.label = f"pid {proc.pid}"

    async def poll(self) -> Exit | None:
        code = self.proc.poll()
        return None if code is None else Exit(code, death(code))

    def stop(self) -> None:
        if self.proc.poll() is None:
            (self.folder / CANCEL_FILE).touch()  # a cancel, not any SIGTERM (the module doc)
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    async def release(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, 5)

    def _signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # the worker's whole session (data loaders too)


class LocalLauncher:
    """`python -m <module> <folder>` (or torchrun's agent, `launch_command`) with `env()`."""

    def __init__(self, module: str, env: Callable[[], Mapping[str, str]]) -> None:
        self.module = module
        self.env = env

    async def start(self, job_id: str, folder: Path, plan: dict[str, Any]) -> Workers:
        with (folder / LOG_FILE).open("ab") as out:
            proc = subprocess.Popen(
                launch_command(self.module, folder, plan),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env()),
                start_new_session=True,
            )
        return LocalWorkers(proc, folder)

    async def forget(self, job_id: str) -> None:
        """Nothing: a worker on this host died with the trainer (PR_SET_PDEATHSIG)."""


class Routed:
    """`remote` for the jobs it takes (`takes(plan)`), `local` for the others."""

    def __init__(
        self, local: Launcher, remote: Launcher, takes: Callable[[dict[str, Any]], bool]
    ) -> None:
        self.local, self.remote, self.takes = local, remote, takes

    async def start(self, job_id: str, folder: Path, plan: dict[str, Any]) -> Workers:
        launcher = self.remote if self.takes(plan) else self.local
        return await launcher.start(job_id, folder, plan)

    async def forget(self, job_id: str) -> None:
        await self.local.forget(job_id)
        await self.remote.forget(job_id)


def multi_node(plan: dict[str, Any]) -> bool:
    """Whether the plan spans several nodes.

    >>> multi_node({"num_nodes": 2}), multi_node({"devices_per_node": 8})
    (True, False)
    """
    return int(plan.get("num_nodes", 1)) > 1


def death(returncode: int | None) -> str:
    """How a process ended, in words.

    >>> death(-9), death(1)
    ('was killed by SIGKILL', 'exited with code 1')
    """
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed (exit code {returncode})"
    return f"exited with code {returncode}"
