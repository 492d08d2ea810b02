"""The code scorer: runs a completion's code against the row's tests in a sandbox.

Isolation (see sandbox_launcher.py): new mount/network/PID/IPC/UTS namespaces, a read-only
minimal root entered with pivot_root, a size-limited tmpfs scratch, no capabilities, an
unprivileged uid per slot when the service runs as root, rlimits (CPU, address space,
processes, file size, open files), an empty environment and a wall-clock limit. Memory is
bounded for the sample's whole process tree (sandbox_memory.py): a cgroup v2 per sample, or
an address space of memory_mb / max_processes per process.

Outcomes come only from facts the program cannot forge: the launcher's status file (wait4
status and rusage, processes left, largest file) and the service's own wall clock. Exit codes
and output the program controls never decide TIMEOUT or ERROR; a pass also needs the runner's
nonce-tagged verdict and a clean exit.

Nothing here parses the row's tests: the server only checks sizes, and the runner compiles the
tests inside the sandbox (CPU- and memory-limited) before any user code runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from services.reward.domain import Outcome, Sample, Status
from services.reward.engine import ScoreContext, scorer_timeout
from services.reward.sandbox_memory import (
    MIB,
    CgroupUsage,
    MemoryMode,
    MemoryPolicy,
    SampleCgroup,
    choose_policy,
)
from services.reward.text import extract
from services.specs.evaluator_defaults import duration_s
from tlm.reward.v1 import evaluator_pb2 as ev

log = structlog.get_logger("tlm.reward.sandbox")

HERE = Path(__file__).parent
LAUNCHER = HERE / "sandbox_launcher.py"
RUNNER = HERE / "sandbox_runner.py"
OUTPUT_TAIL = 64 * 1024
# Peak RSS at or above this share of the address-space limit counts as hitting it...
MEMORY_SHARE = 0.75
# ...or within this much of it: a process that fills its address space stays about 8 MiB
# below it in RSS (the interpreter's mapped but never resident pages).
ADDRESS_SPACE_HEADROOM = 12 * MIB
SCRATCH_INODES = 1024
# Largest code or tests value run (UTF-8 KiB); TLM_REWARD_SANDBOX_MAX_SOURCE_KB sets another.
MAX_SOURCE_KB = 256


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    max_processes: int = 16
    max_file_mb: int = 10

    @property
    def scratch_mb(self) -> int:
        """The whole scratch tmpfs: one file at the limit plus room for the sources."""
        return self.max_file_mb + 16

    def capped(self, caps: Limits) -> Limits:
        """Each limit no higher than the operator's cap."""
        return Limits(
            wall_s=min(self.wall_s, caps.wall_s),
            cpu_seconds=min(self.cpu_seconds, caps.cpu_seconds),
            memory_mb=min(self.memory_mb, caps.memory_mb),
            max_processes=min(self.max_processes, caps.max_processes),
            max_file_mb=min(self.max_file_mb, caps.max_file_mb),
        )


def read_only_binds() -> list[str]:
    """What the program may see: system libraries and this Python's installation."""
    python_home = Path(os.path.realpath(sys.executable)).parent.parent
    paths = ["/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", str(python_home)]
    return [p for p in paths if os.path.lexists(p)]


def classify(
    report: Mapping[str, Any] | None,
    verdict: Mapping[str, Any] | None,
    limits: Limits,
    usage: CgroupUsage = CgroupUsage(),
    address_space_mb: int | None = None,
) -> Outcome:
    """The outcome from the launcher's report and the cgroup's usage (trusted) and the runner's
    verdict (needed for a pass, never enough to turn a failure into TIMEOUT or ERROR).

    >>> ok = {"exit": 0, "signal": None, "cpu_s": 0.1, "maxrss_kb": 9000, "lingering": 0,
    ...       "largest_file": 0, "scratch_full": False}
    >>> classify(ok, {"ran": True, "passed": True}, Limits()).raw
    1.0
    >>> classify(ok | {"exit": 137}, None, Limits()).status.name  # exits 137 by itself
    'OK'
    >>> classify(ok | {"signal": 24, "cpu_s": 5.0}, None, Limits()).status.name
    'TIMEOUT'
    >>> classify(ok | {"signal": 9, "cpu_s": 0.2}, None, Limits()).reason
    'the program ended before the tests finished (signal 9)'
    >>> classify({"unavailable": "unshare: EPERM"}, None, Limits()).status.name
    'ERROR'
    >>> classify(None, None, Limits(memory_mb=128), CgroupUsage(1, 128.0)).reason  # init OOM-killed
    'memory limit of 128 MiB reached (the kernel ended 1 process(es); peak 128 MiB)'
    >>> classify(ok | {"maxrss_kb": 21 * 1024}, None, Limits(), address_space_mb=32).reason
    'memory limit reached (32 MiB of address space per process)'
    """
    passed = _passed(report, verdict)
    if usage.oom_kills and not passed:
        peak = "" if usage.peak_mb is None else f"; peak {usage.peak_mb:.0f} MiB"
        why = f"the kernel ended {usage.oom_kills} process(es){peak}"
        return Outcome.error(f"memory limit of {limits.memory_mb} MiB reached ({why})")
    if report is None or "unavailable" in report:
        why = (report or {}).get("unavailable", "the launcher reported nothing")
        log.error("sandbox_unavailable", reason=why)
        return Outcome.error(f"sandbox unavailable: {why}")
    if passed:
        return Outcome.ok(1.0)
    limit_hit = _limit_hit(report, limits, address_space_mb or limits.memory_mb)
    if limit_hit is not None:
        return limit_hit
    if verdict is not None and isinstance(verdict.get("tests_error"), str):
        # Written before any user code ran: the row's tests do not compile.
        return Outcome.unscorable(f"the row's tests are not valid Python: {verdict['tests_error']}")
    if verdict is None:
        how = f"exit {report['exit']}" if report["signal"] is None else f"signal {report['signal']}"
        return Outcome(Status.OK, 0.0, f"the program ended before the tests finished ({how})")
    if not verdict.get("ran"):
        return Outcome(Status.OK, 0.0, "the code raised an exception")
    return Outcome(Status.OK, 0.0, "the tests failed")


def _passed(report: Mapping[str, Any] | None, verdict: Mapping[str, Any] | None) -> bool:
    if report is None or "unavailable" in report or verdict is None:
        return False
    return bool(verdict.get("passed")) and report["exit"] == 0


def _limit_hit(report: Mapping[str, Any], limits: Limits, address_space_mb: int) -> Outcome | None:
    """TIMEOUT or ERROR when the report shows the program reached one of its limits.

    The kernel's SIGXCPU is the CPU limit, though the rusage the launcher reads can trail the
    kernel's own count on a loaded machine; half the limit still tells it from a program that
    sent itself the signal early.

    >>> r = {"cpu_s": 1.6, "signal": 24, "maxrss_kb": 0, "largest_file": 0,
    ...      "scratch_full": False, "lingering": 0}
    >>> _limit_hit(r, Limits(cpu_seconds=2), 64).status.name
    'TIMEOUT'
    >>> _limit_hit(r | {"cpu_s": 0.1}, Limits(cpu_seconds=2), 64) is None
    True
    """
    share = 0.5 if report.get("signal") == signal.SIGXCPU else 0.95
    if report["cpu_s"] >= limits.cpu_seconds * share:
        return Outcome.timeout(f"CPU time limit of {limits.cpu_seconds}s reached")
    space = address_space_mb * MIB
    if report["maxrss_kb"] * 1024 >= min(MEMORY_SHARE * space, space - ADDRESS_SPACE_HEADROOM):
        per_process = f"{address_space_mb} MiB of address space per process"
        return Outcome.error(f"memory limit reached ({per_process})")
    if report["largest_file"] >= max(limits.max_file_mb * MIB, 1):
        return Outcome.error("file size limit reached")
    if report["scratch_full"]:
        return Outcome.error("scratch space limit reached")
    if limits.max_processes > 1 and report["lingering"] >= limits.max_processes - 1:
        return Outcome.error("process limit reached")
    return None


class Sandbox:
    """At most `slots` samples run at once, so the service's sandbox memory is bounded by
    slots x (memory_mb cap + scratch), whichever memory mode is in force."""

    def __init__(
        self,
        slots: int,
        uid_base: int,
        caps: Limits | None = None,
        memory: MemoryPolicy | None = None,
    ) -> None:
        self._free: asyncio.Queue[int] | None = None
        self._slots = slots
        self._uid_base = uid_base
        self.caps = caps or Limits(wall_s=60.0, cpu_seconds=60, memory_mb=4096,
                                   max_processes=64, max_file_mb=100)  # fmt: skip
        self.memory = memory or choose_policy("auto", None)
        self.binds = read_only_binds()
        self._log_memory_mode()

    def _log_memory_mode(self) -> None:
        if self.memory.mode is MemoryMode.REFUSED:
            log.error("sandbox_refused", reason=self.memory.why)
            return
        per_sample = self.caps.memory_mb
        if self.memory.mode is MemoryMode.RLIMIT:
            per_sample += self.caps.scratch_mb  # tmpfs pages are outside every RLIMIT_AS
        log.info(
            "sandbox_memory", mode=self.memory.mode.value, why=self.memory.why,
            cgroup=str(self.memory.cgroup or ""), slots=self._slots,
            sample_max_mb=per_sample, total_max_mb=self._slots * per_sample,
        )  # fmt: skip

    def _queue(self) -> asyncio.Queue[int]:
        if self._free is None:
            self._free = asyncio.Queue()
            for i in range(self._slots):
                self._free.put_nowait(i)
        return self._free

    async def run(
        self, code: str, tests: str, limits: Limits, deadline: float | None = None
    ) -> Outcome:
        """`deadline` (time.monotonic()) bounds the wall clock from when a slot is free."""
        limits = limits.capped(self.caps)
        refused = self.memory.problem(limits.memory_mb, limits.max_processes)
        if refused is not None:
            return Outcome.error(refused)
        free = self._queue()
        slot = await free.get()
        try:
            if deadline is not None:
                wall = min(limits.wall_s, deadline - time.monotonic() - 0.1)
                if wall <= 0:
                    return Outcome.timeout("no sandbox slot was free before the deadline")
                limits = replace(limits, wall_s=wall)
            return await self._run_in_slot(slot, code, tests, limits)
        finally:
            free.put_nowait(slot)

    async def _run_in_slot(self, slot: int, code: str, tests: str, limits: Limits) -> Outcome:
        uid = self._uid_base + slot
        base = Path(tempfile.mkdtemp(prefix="tlm-sandbox-"))
        cgroup: SampleCgroup | None = None
        try:
            if self.memory.cgroup is not None:
                cgroup = await self._cgroup(slot, limits)
                if cgroup is None:
                    return Outcome.error("sandbox unavailable: cannot create the sample's cgroup")
            return await self._launch(base, uid, code, tests, limits, cgroup)
        finally:
            if cgroup is not None:
                await asyncio.to_thread(cgroup.remove)
            if os.geteuid() == 0:
                await asyncio.to_thread(kill_uid, uid)
            await asyncio.to_thread(shutil.rmtree, base, True)

    async def _cgroup(self, slot: int, limits: Limits) -> SampleCgroup | None:
        assert self.memory.cgroup is not None
        name = f"sample-{slot}-{secrets.token_hex(4)}"
        try:
            return await asyncio.to_thread(
                SampleCgroup.create,
                self.memory.cgroup,
                name,
                limits.memory_mb,
                limits.max_processes,
            )
        except OSError as exc:
            log.error("sandbox_cgroup_failed", cgroup=str(self.memory.cgroup), error=str(exc))
            return None

    async def _launch(
        self,
        base: Path,
        uid: int,
        code: str,
        tests: str,
        limits: Limits,
        cgroup: SampleCgroup | None,
    ) -> Outcome:
        nonce = secrets.token_hex(16)
        space = self.memory.address_space_mb(limits.memory_mb, limits.max_processes)
        where = cgroup.path if cgroup else None
        config = prepare(base, code, tests, limits, self.binds, uid, nonce, space, where)
        timed_out = await self._execute(base, config, limits.wall_s)
        usage = cgroup.usage() if cgroup else CgroupUsage()
        if timed_out and not usage.oom_kills:
            return Outcome.timeout(f"wall-clock limit of {limits.wall_s:g}s reached")
        return classify(read_report(base), read_verdict(base, nonce), limits, usage, space)

    async def _execute(self, base: Path, config: dict[str, object], wall_s: float) -> bool:
        """Runs the launcher; True when the wall-clock limit killed it."""
        with (base / "stdout").open("wb") as out, (base / "stderr").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(config),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, env={},
            )  # fmt: skip
            try:
                await asyncio.wait_for(proc.wait(), wall_s)
                return False
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                return True
            except asyncio.CancelledError:
                _kill_group(proc.pid)
                await asyncio.shield(proc.wait())
                raise


def prepare(
    base: Path,
    code: str,
    tests: str,
    limits: Limits,
    binds: Sequence[str],
    uid: int,
    nonce: str,
    address_space_mb: int | None = None,
    cgroup: Path | None = None,
) -> dict[str, object]:
    """Writes the program's sources under `base` and returns the launcher's config; the
    launcher joins `cgroup` (a sample's own) before anything else."""
    src = base / "src"
    (base / "root").mkdir()
    src.mkdir()
    (src / "solution.py").write_text(code)
    (src / "tests.py").write_text(tests)
    shutil.copy(RUNNER, src / "runner.py")
    return {
        "root": str(base / "root"),
        "src": str(src),
        "status": str(base / "status"),
        "binds": list(binds),
        "python": os.path.realpath(sys.executable),
        "uid": uid,
        "nonce": nonce,
        "cgroup": str(cgroup) if cgroup else None,
        "cpu_seconds": limits.cpu_seconds,
        "address_space_mb": address_space_mb or limits.memory_mb,
        "max_processes": limits.max_processes,
        "max_file_mb": limits.max_file_mb,
        "scratch_mb": limits.scratch_mb,
        "scratch_inodes": SCRATCH_INODES,
    }


def read_report(base: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        report = json.loads((base / "status").read_text().splitlines()[0])
        return report if isinstance(report, dict) else None
    return None


def read_verdict(base: Path, nonce: str) -> dict[str, Any] | None:
    for line in reversed(_tail(base / "stdout").splitlines()):
        if line.startswith(nonce):
            with contextlib.suppress(ValueError):
                verdict = json.loads(line[len(nonce) :])
                return verdict if isinstance(verdict, dict) else None
    return None


def kill_uid(uid: int, wait_s: float = 5.0) -> None:
    """Backstop: SIGKILL every process of a slot's uid (it belongs to that slot alone), and wait
    until they are gone: dying ones still count against the slot's next RLIMIT_NPROC."""
    deadline = time.monotonic() + wait_s
    while pids := _pids_of(uid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("sandbox_uid_left", uid=uid, pids=pids)
            return
        time.sleep(0.01)


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
            status = (entry / "status").read_text()
            real = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if int(real.split()[1]) == uid:
                pids.append(int(entry.name))
    return pids


def _kill_group(pid: int) -> None:
    # The launcher leads its own session; its init dies with it (PR_SET_PDEATHSIG), and the
    # kernel kills everything in a PID namespace whose init is gone.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError), path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - OUTPUT_TAIL))
        return f.read().decode(errors="replace")
    return ""


class CodeScorerAdapter:
    # Samples run independently: the engine times each out alone, keeping finished results.
    per_sample = True

    def __init__(self, sandbox: Sandbox, max_source_kb: int = MAX_SOURCE_KB) -> None:
        self.sandbox = sandbox
        self.max_source_kb = max_source_kb

    async def score(
        self, scorer: ev.ScorerSpec, samples: Sequence[Sample], ctx: ScoreContext
    ) -> list[Outcome]:
        return list(await asyncio.gather(*(self._one(scorer, s, ctx) for s in samples)))

    async def _one(self, scorer: ev.ScorerSpec, sample: Sample, ctx: ScoreContext) -> Outcome:
        cfg = scorer.code
        field = cfg.tests_field or "tests"
        tests = sample.metadata.get(field)
        if not isinstance(tests, str):
            return Outcome.unscorable(f"metadata has no {field!r} string")
        # Sizes only, on the event loop: the tests are compiled inside the sandbox.
        if (size := _over(tests, self.max_source_kb)) is not None:
            return Outcome.unscorable(
                f"metadata.{field} is {size} KiB, over the {self.max_source_kb} KiB limit"
            )
        code = _code_of(sample.completion, cfg.extraction)
        if code is None:
            return Outcome.unscorable("the completion has no code to run")
        if (size := _over(code, self.max_source_kb)) is not None:
            # The policy's own output: a program too big to run fails, it is not masked.
            reason = f"the code is {size} KiB, over the {self.max_source_kb} KiB limit"
            return Outcome(Status.OK, 0.0, reason)
        return await self.sandbox.run(code, tests, _limits(scorer), deadline=ctx.deadline)


def _limits(scorer: ev.ScorerSpec) -> Limits:
    cfg = scorer.code
    own = duration_s(cfg.timeout) if cfg.HasField("timeout") else 10.0
    return Limits(
        wall_s=min(own, scorer_timeout(scorer)),
        cpu_seconds=cfg.cpu_seconds if cfg.HasField("cpu_seconds") else 5,
        memory_mb=cfg.memory_mb if cfg.HasField("memory_mb") else 512,
        max_processes=cfg.max_processes if cfg.HasField("max_processes") else 16,
        max_file_mb=cfg.max_file_mb if cfg.HasField("max_file_mb") else 10,
    )


def _over(text: str, limit_kb: int) -> int | None:
    """The UTF-8 size of `text` in KiB (rounded up) when over `limit_kb`, else None.

    >>> _over("x" * 1025, 1), _over("x" * 1024, 1), _over("é" * 600, 1)
    (2, None, 2)
    """
    size = len(text.encode(errors="replace"))  # a copy of at most the request's size
    return -(-size // 1024) if size > limit_kb * 1024 else None


def _code_of(completion: str, extraction: ev.Extraction) -> str | None:
    if extraction.tag or extraction.code_block:
        return extract(completion, extraction.tag, extraction.code_block)
    return extract(completion, code_block=True) or completion
