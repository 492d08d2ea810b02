"""Security-review findings on the code scorer: memory is bounded for a sample's whole process
tree (cgroup v2 per sample, or memory_mb / max_processes per process), and oversized or
slow-to-parse tests never block the server's event loop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from services.devtools.server_thread import ServerThread
from services.reward.domain import Status
from services.reward.sandbox import (
    LAUNCHER,
    Limits,
    Sandbox,
    kill_uid,
    prepare,
    read_only_binds,
    read_report,
)
from services.reward.sandbox_memory import (
    CgroupUsage,
    MemoryMode,
    MemoryPolicy,
    SampleCgroup,
    cgroup_problem,
    choose_policy,
)
from tests.reward.conftest import start_reward
from tests.reward.helpers import code_spec, sample
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

MEMORY_MB, PROCESSES, CHILDREN = 128, 4, 3
TARGET_MB = int(MEMORY_MB * 0.8)  # each child alone would fit; together they would not
RLIMIT = MemoryPolicy(MemoryMode.RLIMIT)
TEST_UID = 64950

# Children each touch every page of up to `target` MiB, report how much they hold (one byte),
# and keep it until all have reported, so the sum is memory held at the same time.
FORKS = """
import os

MIB = 1 << 20


def hold(target, report, release):
    held = []
    try:
        while len(held) < target:
            chunk = bytearray(MIB)
            for i in range(0, MIB, 4096):
                chunk[i] = 1
            held.append(chunk)
    except MemoryError:
        pass
    os.write(report, bytes([len(held)]))
    os.close(report)
    os.read(release, 1)
    os._exit(0)


def run(children, target):
    reports, report = os.pipe()
    release, let_go = os.pipe()
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            os.close(reports)
            os.close(let_go)
            hold(target, report, release)
        pids.append(pid)
    os.close(report)
    got = b""
    while chunk := os.read(reports, 64):
        got += chunk
    os.close(let_go)
    for pid in pids:
        os.waitpid(pid, 0)
    return list(got)


held = run({children}, {target})
print("HELD " + str(held), flush=True)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Its own slot uids: other test sessions on this host use the default base, and a uid's
    RLIMIT_NPROC counts their processes too."""
    running = start_reward(tmp_path_factory.mktemp("hardening"), sandbox_uid_base=64700)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reward(server: ServerThread) -> Iterator[rs_grpc.RewardServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield rs_grpc.RewardServiceStub(channel)


def forks(children: int = CHILDREN) -> str:
    return FORKS.format(children=children, target=TARGET_MB)


# --- Finding 1: memory_mb bounds the whole process tree --------------------------------------


def test_forked_children_cannot_multiply_memory_mb(reward: rs_grpc.RewardServiceStub) -> None:
    """Through the API, in whichever mode this host runs: an honest program that wants 3 x 102
    MiB under memory_mb=128 does not get it, and the sample says why."""
    limits = {"timeout": "10s", "memory_mb": MEMORY_MB, "max_processes": PROCESSES}
    tests = f"assert held == [{TARGET_MB}] * {CHILDREN}, held"
    request = rs.ScoreRequest(spec=code_spec(**limits), samples=[sample("s", forks(), tests=tests)])
    result = reward.Score(request, timeout=30).results[0].scorers[0]
    assert result.status in (rs.SCORE_STATUS_ERROR, rs.SCORE_STATUS_TIMEOUT), result
    assert "memory" in result.reason, result.reason


def _launch(
    code: str, limits: Limits, policy: MemoryPolicy, cgroup: Path | None = None
) -> tuple[dict[str, Any] | None, str]:
    """Runs the launcher as the service would, returning its report and the program's stdout."""
    base = Path(tempfile.mkdtemp(prefix="tlm-test-"))
    try:
        space = policy.address_space_mb(limits.memory_mb, limits.max_processes)
        config = prepare(
            base, code, "", limits, read_only_binds(), TEST_UID, "n" * 32, space, cgroup
        )
        done = subprocess.run(
            [str(config["python"]), "-I", "-S", str(LAUNCHER), json.dumps(config)],
            capture_output=True, text=True, timeout=60, env={},
        )  # fmt: skip
        return read_report(base), done.stdout
    finally:
        if os.geteuid() == 0:
            kill_uid(TEST_UID)
        shutil.rmtree(base, ignore_errors=True)


def _held(stdout: str) -> list[int]:
    line = next(line for line in stdout.splitlines() if line.startswith("HELD "))
    return list(json.loads(line[5:]))


def test_rlimit_mode_bounds_the_sum_over_processes() -> None:
    """Measured by the children themselves: what they hold at once stays within memory_mb.
    Control: given memory_mb x max_processes, one child does hold its whole target."""
    limits = Limits(memory_mb=MEMORY_MB, max_processes=PROCESSES)
    report, stdout = _launch(forks(), limits, RLIMIT)
    held = _held(stdout)
    assert len(held) == CHILDREN, (held, report)
    assert sum(held) <= MEMORY_MB, held
    assert report is not None and report["maxrss_kb"] >= 16 * 1024, report  # they did fill up

    roomy = Limits(memory_mb=MEMORY_MB * PROCESSES, max_processes=PROCESSES)
    report, stdout = _launch(forks(1), roomy, RLIMIT)
    assert _held(stdout) == [TARGET_MB], (stdout, report)


def test_rlimit_mode_refuses_a_share_too_small_to_run() -> None:
    """16 processes in 128 MiB is 8 MiB each: not enough to start Python, so it is refused
    with the reason instead of failing as the program's fault (OK 0.0)."""
    sandbox = Sandbox(1, TEST_UID, memory=RLIMIT)
    outcome = asyncio.run(sandbox.run("", "assert True", Limits(memory_mb=128, max_processes=16)))
    assert outcome.status == Status.ERROR
    assert "8 MiB per process" in outcome.reason and "max_processes" in outcome.reason


def _cgroup2_mounts() -> list[Path]:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return [Path(line.split()[1]) for line in mounts if line.split()[2] == "cgroup2"]


@pytest.fixture
def delegated_cgroup() -> Iterator[Path]:
    """TLM_TEST_SANDBOX_CGROUP, else a fresh child of a cgroup v2 mount (as root)."""
    configured = os.environ.get("TLM_TEST_SANDBOX_CGROUP")
    if configured:
        if why := cgroup_problem(Path(configured)):
            pytest.skip(f"TLM_TEST_SANDBOX_CGROUP is not usable: {why}")
        yield Path(configured)
        return
    reasons = []
    for mount in _cgroup2_mounts() or [Path("/sys/fs/cgroup")]:
        # Only a child of ours is changed (controllers enabled), never the mount's own files.
        child = mount / f"tlm-test-{secrets.token_hex(4)}"
        try:
            child.mkdir()
        except OSError as exc:
            reasons.append(f"{child}: {exc.strerror}")
            continue
        if why := cgroup_problem(child):
            child.rmdir()
            reasons.append(why)
            continue
        yield child
        child.rmdir()
        return
    pytest.skip("no usable cgroup v2 on this host: " + "; ".join(reasons))


def test_cgroup_mode_bounds_the_process_tree(delegated_cgroup: Path) -> None:
    """The kernel's own count: the sample's cgroup peaked within memory_mb and its OOM killer
    ended processes; the cgroup is gone afterwards."""
    policy = choose_policy("cgroup", delegated_cgroup)
    assert policy.mode is MemoryMode.CGROUP, policy.why
    sandbox = Sandbox(1, TEST_UID, memory=policy)
    limits = Limits(wall_s=20.0, memory_mb=MEMORY_MB, max_processes=PROCESSES)
    tests = f"assert held == [{TARGET_MB}] * {CHILDREN}, held"
    outcome = asyncio.run(sandbox.run(forks(), tests, limits))
    assert outcome.status == Status.ERROR, outcome
    found = re.search(r"ended (\d+) process.*peak (\d+) MiB", outcome.reason)
    assert found is not None, outcome.reason
    assert int(found[1]) >= 1 and int(found[2]) <= MEMORY_MB, outcome.reason
    assert not [p for p in delegated_cgroup.iterdir() if p.name.startswith("sample-")]


def test_cgroup_mode_flow_against_a_stand_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where no cgroup v2 can be had (this host), a plain directory stands in for the delegated
    one: the sample's cgroup gets its limits, the launcher joins it, the kernel's OOM count
    decides the reason, and removal is attempted. Enforcement itself is the test above."""
    kernel_says = CgroupUsage(oom_kills=2, peak_mb=127.6)
    monkeypatch.setattr(SampleCgroup, "usage", lambda self: kernel_says)
    sandbox = Sandbox(1, TEST_UID, memory=MemoryPolicy(MemoryMode.CGROUP, cgroup=tmp_path))
    limits = Limits(memory_mb=MEMORY_MB, max_processes=PROCESSES)
    with capture_logs() as logs:
        outcome = asyncio.run(sandbox.run("x = 1", "assert x == 2", limits))
    assert outcome.status == Status.ERROR, outcome
    assert outcome.reason == (
        "memory limit of 128 MiB reached (the kernel ended 2 process(es); peak 128 MiB)"
    )
    [sample_dir] = list(tmp_path.iterdir())  # a plain directory cannot be rmdir'ed: left, logged
    files = {f.name: f.read_text().strip() for f in sample_dir.iterdir()}
    assert files["memory.max"] == str(MEMORY_MB * 1024 * 1024)
    assert files["pids.max"] == str(PROCESSES + 2)
    assert files["cgroup.procs"].isdigit() and files["cgroup.kill"] == "1"
    assert "sandbox_cgroup_left" in [e["event"] for e in logs]


def test_unusable_cgroup_falls_back_to_rlimit_or_refuses(tmp_path: Path) -> None:
    """auto: per-process rlimits, with the reason logged at start; cgroup required: every code
    sample is ERROR "sandbox unavailable", nothing runs."""
    with capture_logs() as logs:
        fallback = Sandbox(2, TEST_UID, memory=choose_policy("auto", tmp_path))
    assert fallback.memory.mode is MemoryMode.RLIMIT
    started = next(e for e in logs if e["event"] == "sandbox_memory")
    assert started["mode"] == "rlimit" and "not a cgroup v2 directory" in started["why"]
    assert started["total_max_mb"] == 2 * started["sample_max_mb"]

    with capture_logs() as logs:
        refused = Sandbox(1, TEST_UID, memory=choose_policy("cgroup", tmp_path))
    assert [e["event"] for e in logs] == ["sandbox_refused"]
    outcome = asyncio.run(refused.run("print('ran')", "assert True", Limits()))
    assert outcome.status == Status.ERROR
    assert outcome.reason.startswith("sandbox unavailable: ") and str(tmp_path) in outcome.reason


def test_launcher_joins_the_sample_cgroup_first(tmp_path: Path) -> None:
    """The launcher writes its own pid to cgroup.procs before it builds anything (a plain file
    stands in for the kernel's), and a cgroup it cannot join is "unavailable", not a run."""
    fake = tmp_path / "sample"
    fake.mkdir()
    (fake / "cgroup.procs").write_text("")
    report, stdout = _launch("print('ran')", Limits(), RLIMIT, cgroup=fake)
    assert report is not None and "unavailable" not in report, report
    assert (fake / "cgroup.procs").read_text().strip().isdigit()
    assert "ran" in stdout

    report, stdout = _launch("print('ran')", Limits(), RLIMIT, cgroup=tmp_path / "missing")
    assert report is not None and "join cgroup" in report.get("unavailable", ""), report
    assert "ran" not in stdout


@pytest.mark.slow  # runs sandboxed programs for seconds
def test_slots_bound_the_samples_running_at_once() -> None:
    """The memory bound is slots x memory_mb: with one slot, three sleeping samples run one
    after another."""
    sandbox = Sandbox(1, TEST_UID, memory=RLIMIT)
    code, limits = "import time\ntime.sleep(0.4)", Limits(wall_s=5.0, max_processes=4)

    async def three() -> float:
        start = time.monotonic()
        outcomes = await asyncio.gather(*(sandbox.run(code, "", limits) for _ in range(3)))
        assert all(o.status == Status.OK for o in outcomes), outcomes
        return time.monotonic() - start

    assert asyncio.run(three()) >= 3 * 0.4


# --- Finding 2: oversized or slow-to-parse tests never block the event loop -------------------


# A separate process: a poller thread in the server's process would stall on the same GIL
# that a long parse holds, and not see the stall it is meant to measure.
POLL = """
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(sys.argv[1]))
stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
print("ready", flush=True)
latencies = []
while not stop.is_set():
    start = time.monotonic()
    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
    latencies.append(time.monotonic() - start)
    time.sleep(0.02)
print(json.dumps(latencies), flush=True)
"""


class HealthPoller:
    """Polls gRPC health from another process and records how long each check took."""

    def __init__(self, address: str) -> None:
        self.latencies: list[float] = []
        self._address = address

    def __enter__(self) -> HealthPoller:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", POLL, self._address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self._proc.stdout is not None and self._proc.stdout.readline() == "ready\n"
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate(input="", timeout=60)
        self.latencies = json.loads(out)


def _score_while_polling(
    server: ServerThread, reward: rs_grpc.RewardServiceStub, request: rs.ScoreRequest
) -> tuple[rs.ScorerResult, list[float]]:
    with HealthPoller(server.address) as poller:
        time.sleep(0.1)
        result = reward.Score(request, timeout=60).results[0].scorers[0]
        time.sleep(0.1)
    return result, poller.latencies


def test_huge_tests_are_refused_before_parsing(
    server: ServerThread, reward: rs_grpc.RewardServiceStub
) -> None:
    """A 4 MiB tests value (7.8 s of ast.parse on the loop before): UNSCORABLE naming the field
    and the limit, and every health check meanwhile answers in under 3 s."""
    tests = "assert add(1, 2) == 3\n" * (4 * 1024 * 1024 // 22)
    spec = code_spec(timeout="10s", tests_field="checks")
    request = rs.ScoreRequest(spec=spec, samples=[sample("s", "x = 1", checks=tests)])
    result, latencies = _score_while_polling(server, reward, request)
    assert result.status == rs.SCORE_STATUS_UNSCORABLE, result
    assert "metadata.checks" in result.reason and "256 KiB limit" in result.reason, result.reason
    assert latencies and max(latencies) < 3.0, latencies


@pytest.mark.slow  # runs sandboxed programs for seconds
def test_slow_to_parse_tests_are_compiled_in_the_sandbox(
    server: ServerThread, reward: rs_grpc.RewardServiceStub
) -> None:
    """Under the limit but costly to parse (a 240 KiB list literal: ~0.75 s of ast.parse here):
    the server does not parse it, health stays under 1 s, and the sample is still scored."""
    tests = "x = [" + "1," * 120_000 + "]\nassert len(x) == 120_000\n"
    limits = {"timeout": "20s", "cpu_seconds": 10, "memory_mb": 256, "max_processes": 2}
    request = rs.ScoreRequest(spec=code_spec(**limits), samples=[sample("s", "", tests=tests)])
    result, latencies = _score_while_polling(server, reward, request)
    assert (result.status, result.value) == (rs.SCORE_STATUS_OK, 1.0), result
    assert latencies and max(latencies) < 1.0, latencies


@pytest.mark.parametrize(
    ("tests", "reason"),
    [
        ("def broken(:", "invalid syntax"),
        ("x = 1\x00", "null bytes"),
    ],
)
def test_broken_tests_are_unscorable_from_inside_the_sandbox(
    reward: rs_grpc.RewardServiceStub, tests: str, reason: str
) -> None:
    """The runner compiles the tests before any user code and says so: still UNSCORABLE."""
    code = "raise SystemExit(0)"  # never runs: the tests are compiled first
    request = rs.ScoreRequest(
        spec=code_spec(timeout="5s"), samples=[sample("s", code, tests=tests)]
    )
    result = reward.Score(request, timeout=30).results[0].scorers[0]
    assert result.status == rs.SCORE_STATUS_UNSCORABLE and reason in result.reason, result


def test_oversized_code_is_a_failing_program(reward: rs_grpc.RewardServiceStub) -> None:
    """The policy's own output over the limit scores 0.0 (a reward), not a masked status it
    could hide behind."""
    code = "x = 1\n" * (300 * 1024 // 6)
    request = rs.ScoreRequest(spec=code_spec(timeout="5s"), samples=[sample("s", code, tests="")])
    result = reward.Score(request, timeout=30).results[0].scorers[0]
    assert (result.status, result.value) == (rs.SCORE_STATUS_OK, 0.0), result
    assert "256 KiB limit" in result.reason, result.reason
