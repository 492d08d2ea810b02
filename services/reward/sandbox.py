"""The code scorer: runs a completion's code against the row's tests in a sandbox.

Isolation (see sandbox_launcher.py): new mount/network/PID/IPC/UTS namespaces, a read-only
minimal root with only the scratch directory writable, an unprivileged uid per slot when the
service runs as root, rlimits (CPU, address space, processes, file size, open files), an empty
environment and a wall-clock limit that kills the whole process group.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.reward.domain import Outcome, Sample, Status
from services.reward.engine import ScoreContext, scorer_timeout
from services.reward.spec_defaults import duration_s
from services.reward.text import extract
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward.sandbox")

HERE = Path(__file__).parent
LAUNCHER = HERE / "sandbox_launcher.py"
RUNNER = HERE / "sandbox_runner.py"
UNAVAILABLE = 90
OUTPUT_TAIL = 64 * 1024
LIMIT_REASONS = {
    "memory": "memory limit reached",
    "file_size": "file size limit reached",
    "processes": "process limit reached",
}


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    max_processes: int = 16
    max_file_mb: int = 10
    partial_credit: bool = False


def read_only_binds() -> list[str]:
    """What the program may see: system libraries and this Python's installation."""
    python_home = Path(os.path.realpath(sys.executable)).parent.parent
    paths = ["/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", str(python_home)]
    return [p for p in paths if os.path.lexists(p)]


def value_of(result: dict[str, object], partial: bool) -> float:
    """1.0 when every test statement passed; with partial credit, the share that passed.

    >>> value_of({"passed": 2, "total": 4, "ran": True}, False)
    0.0
    >>> value_of({"passed": 2, "total": 4, "ran": True}, True)
    0.5
    >>> value_of({"passed": 0, "total": 0, "ran": True}, False)
    1.0
    """
    passed, total = int(result["passed"]), int(result["total"])  # type: ignore[call-overload]
    if total == 0:
        return 1.0 if result["ran"] else 0.0
    if partial:
        return passed / total
    return 1.0 if passed == total else 0.0


class Sandbox:
    def __init__(self, slots: int, uid_base: int) -> None:
        self._free: asyncio.Queue[int] | None = None
        self._slots = slots
        self._uid_base = uid_base
        self.binds = read_only_binds()

    def _queue(self) -> asyncio.Queue[int]:
        if self._free is None:
            self._free = asyncio.Queue()
            for i in range(self._slots):
                self._free.put_nowait(i)
        return self._free

    async def run(self, code: str, tests: str, limits: Limits) -> Outcome:
        free = self._queue()
        slot = await free.get()
        try:
            return await self._run_in_slot(slot, code, tests, limits)
        finally:
            free.put_nowait(slot)

    async def _run_in_slot(self, slot: int, code: str, tests: str, limits: Limits) -> Outcome:
        uid = self._uid_base + slot
        base = Path(tempfile.mkdtemp(prefix="tlm-sandbox-"))
        try:
            scratch = base / "scratch"
            (base / "root").mkdir()
            scratch.mkdir()
            (scratch / "solution.py").write_text(code)
            (scratch / "tests.py").write_text(tests)
            shutil.copy(RUNNER, scratch / "runner.py")
            if os.geteuid() == 0:
                for path in [scratch, *scratch.iterdir()]:
                    os.chown(path, uid, uid)
            nonce = secrets.token_hex(16)
            config = {
                "root": str(base / "root"),
                "scratch": str(scratch),
                "binds": self.binds,
                "python": os.path.realpath(sys.executable),
                "argv": ["runner.py", nonce, "1" if limits.partial_credit else "0"],
                "uid": uid,
                "cpu_seconds": limits.cpu_seconds,
                "memory_mb": limits.memory_mb,
                "max_processes": limits.max_processes,
                "max_file_mb": limits.max_file_mb,
            }
            code_or_timeout = await self._execute(base, config, limits.wall_s)
            return _interpret(code_or_timeout, base, nonce, limits)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    async def _execute(self, base: Path, config: dict[str, object], wall_s: float) -> int | None:
        """The launcher's exit code, or None when the wall-clock limit killed it."""
        with (base / "stdout").open("wb") as out, (base / "stderr").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(config),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, env={},
            )  # fmt: skip
            try:
                return await asyncio.wait_for(proc.wait(), wall_s)
            except (TimeoutError, asyncio.CancelledError):
                _kill_group(proc.pid)
                await proc.wait()
                return None


def _kill_group(pid: int) -> None:
    # The launcher leads its own session; killing it also kills the namespace's PID 1
    # (PDEATHSIG), which takes every process in the namespace with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - OUTPUT_TAIL))
        return f.read().decode(errors="replace")


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else "no output"


def _interpret(exit_code: int | None, base: Path, nonce: str, limits: Limits) -> Outcome:
    if exit_code is None:
        return Outcome.timeout(f"wall-clock limit of {limits.wall_s:g}s reached")
    stderr = _tail(base / "stderr")
    if exit_code == UNAVAILABLE and "sandbox unavailable" in stderr:
        log.error("sandbox_unavailable", stderr=stderr[-500:])
        return Outcome.error(stderr.strip().splitlines()[-1])
    if exit_code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return Outcome.timeout(f"CPU time limit of {limits.cpu_seconds}s reached")
    if exit_code == 128 + signal.SIGXFSZ:
        return Outcome.error(LIMIT_REASONS["file_size"])
    for line in reversed(_tail(base / "stdout").splitlines()):
        if line.startswith(nonce):
            result = json.loads(line[len(nonce) :])
            if result["limit"]:
                return Outcome.error(LIMIT_REASONS[result["limit"]])
            value = value_of(result, limits.partial_credit)
            why = "" if value == 1.0 else f"{result['passed']}/{result['total']} tests passed"
            if not result["ran"]:
                why = f"the code raised: {_last_line(stderr)}"
            return Outcome(Status.OK, value, why)
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return Outcome.error(LIMIT_REASONS["memory"])
    return Outcome(
        Status.OK, 0.0, f"the program ended before the tests finished (exit {exit_code})"
    )


class CodeScorerAdapter:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def score(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[Outcome]:
        return list(await asyncio.gather(*(self._one(scorer, s, ctx) for s in samples)))

    async def _one(self, scorer: ev.ScorerSpec, sample: Sample, ctx: ScoreContext) -> Outcome:
        cfg = scorer.code
        tests = sample.metadata.get(cfg.tests_field or "tests")
        if not isinstance(tests, str):
            return Outcome.unscorable(f"metadata has no {cfg.tests_field or 'tests'!r} string")
        try:
            ast.parse(tests)
        except SyntaxError as exc:
            return Outcome.unscorable(f"the row's tests are not valid Python: {exc.msg}")
        code = _code_of(sample.completion, cfg.extraction)
        if code is None:
            return Outcome.unscorable("the completion has no code to run")
        own = duration_s(cfg.timeout) if cfg.HasField("timeout") else 10.0
        limits = Limits(
            wall_s=max(0.01, min(own, scorer_timeout(scorer), ctx.remaining() - 0.1)),
            cpu_seconds=cfg.cpu_seconds if cfg.HasField("cpu_seconds") else 5,
            memory_mb=cfg.memory_mb if cfg.HasField("memory_mb") else 512,
            max_processes=cfg.max_processes if cfg.HasField("max_processes") else 16,
            max_file_mb=cfg.max_file_mb if cfg.HasField("max_file_mb") else 10,
        )
        return await self.sandbox.run(code, tests, limits)


def _code_of(completion: str, extraction: ev.Extraction) -> str | None:
    if extraction.tag or extraction.code_block:
        return extract(completion, extraction.tag, extraction.code_block)
    return extract(completion, code_block=True) or completion
