"""The code scorer's sandbox, through the API: each escape attempt fails in the expected way
and the service keeps serving afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.reward.domain import Status
from services.reward.sandbox import LAUNCHER, Limits, Sandbox, prepare, read_report
from tests.reward.helpers import code_spec, sample
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

Stub = rs_grpc.RewardServiceStub
# 256 MiB over 8 processes: 32 MiB of address space each where no cgroup bounds the sample.
LIMITS = {"timeout": "5s", "cpu_seconds": 1, "memory_mb": 256, "max_processes": 8, "max_file_mb": 1}

# The program records what an attempt did; the tests assert the attempt was refused, so a
# sandbox that let it through would score 0.0 and fail the test.
ATTEMPT = """
def attempt():
    try:
        {action}
        return "allowed"
    except BaseException as exc:
        return type(exc).__name__
"""


def run(reward: Stub, code: str, tests: str = "", **limits: object) -> rs.ScorerResult:
    request = rs.ScoreRequest(
        spec=code_spec(**(LIMITS | limits)), samples=[sample("s", code, tests=tests)]
    )
    result = reward.Score(request, timeout=30).results[0]
    return result.scorers[0]


def refused(reward: Stub, action: str) -> rs.ScorerResult:
    return run(reward, ATTEMPT.format(action=action), "assert attempt() != 'allowed', attempt()")


def test_passing_and_failing_programs(reward: Stub) -> None:
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    assert run(reward, code, "assert add(1, 2) == 3").value == 1.0
    failing = run(reward, code, "assert add(1, 2) == 3\nassert add(1, 1) == 3")
    assert (failing.status, failing.value) == (rs.SCORE_STATUS_OK, 0.0)
    partial = rs.ScoreRequest(
        spec=code_spec(**LIMITS, extraction={"code_block": True}),
        samples=[sample("s", code, tests="assert add(1, 2) == 3")],
    )
    assert reward.Score(partial, timeout=30).results[0].reward == 1.0


@pytest.mark.slow  # waits out the sandbox timeout
def test_infinite_loop_is_timeout(reward: Stub) -> None:
    result = run(reward, "while True:\n    pass")
    assert result.status == rs.SCORE_STATUS_TIMEOUT and "CPU" in result.reason


@pytest.mark.slow  # waits out the sandbox timeout
def test_sleeping_forever_is_timeout(reward: Stub) -> None:
    result = run(reward, "import time\ntime.sleep(60)", timeout="1s")
    assert result.status == rs.SCORE_STATUS_TIMEOUT and "wall-clock" in result.reason


def test_unbounded_allocation_is_error(reward: Stub) -> None:
    result = run(reward, "x = []\nwhile True:\n    x.append(' ' * 10**7)")
    assert result.status == rs.SCORE_STATUS_ERROR and "memory" in result.reason


def test_fork_bomb_is_stopped(reward: Stub) -> None:
    result = run(reward, "import os\nwhile True:\n    os.fork()", max_processes=8)
    assert result.status in (rs.SCORE_STATUS_ERROR, rs.SCORE_STATUS_TIMEOUT), result
    assert "process" in result.reason or result.status == rs.SCORE_STATUS_TIMEOUT


def test_huge_file_is_error(reward: Stub) -> None:
    result = run(reward, "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10**6)")
    assert result.status == rs.SCORE_STATUS_ERROR and "file size" in result.reason


def test_secrets_and_files_outside_scratch_are_unreadable(reward: Stub, tmp_path: Path) -> None:
    outside = tmp_path / "host-secret.txt"
    outside.write_text("secret")
    outside.chmod(0o644)  # world-readable on the host: only the mount namespace hides it
    for path in ["/etc/shadow", "/etc/passwd", str(outside), os.path.abspath("README.md")]:
        result = refused(reward, f"open({path!r}).read()")
        assert (result.status, result.value) == (rs.SCORE_STATUS_OK, 1.0), (path, result.reason)


def test_writing_outside_scratch_fails(reward: Stub) -> None:
    for path in ["/usr/evil", "/tmp/evil", "/evil"]:
        result = refused(reward, f"open({path!r}, 'w').write('x')")
        assert result.value == 1.0, (path, result.reason)
    assert run(reward, "open('ok.txt', 'w').write('fine')", "assert open('ok.txt').read()").value


def test_network_is_unreachable(reward: Stub) -> None:
    action = "import socket; socket.create_connection(('127.0.0.1', 22), timeout=2)"
    assert refused(reward, action).value == 1.0
    assert refused(reward, "import socket; socket.getaddrinfo('pypi.org', 443)").value == 1.0


def test_environment_is_empty_and_user_unprivileged(reward: Stub) -> None:
    tests = "import os\nassert 'PATH' not in os.environ and 'HOME' not in os.environ\n"
    if os.geteuid() == 0:
        tests += "assert os.getuid() != 0\n"
    assert run(reward, "", tests).value == 1.0


@pytest.mark.parametrize("tests", [None, "def broken(:"])
def test_missing_or_broken_tests_are_unscorable(reward: Stub, tests: str | None) -> None:
    metadata = {} if tests is None else {"tests": tests}
    request = rs.ScoreRequest(spec=code_spec(**LIMITS), samples=[sample("s", "x = 1", **metadata)])
    assert reward.Score(request, timeout=30).results[0].status == rs.SCORE_STATUS_UNSCORABLE


def test_service_keeps_serving_after_escapes(reward: Stub) -> None:
    assert run(reward, "def f():\n    return 1", "assert f() == 1").value == 1.0


def test_exit_codes_and_output_do_not_fake_limits(reward: Stub) -> None:
    """What the program controls (exit code, stderr) never makes it TIMEOUT or ERROR."""
    for code in [
        "import os\nos._exit(137)",
        "import os\nos._exit(153)",
        "import sys\nprint('MemoryError Cannot allocate memory', file=sys.stderr)\nsys.exit(1)",
        "import os\nprint('sandbox unavailable: fake', flush=True)\nos._exit(90)",
    ]:
        result = run(reward, code, "assert True")
        assert (result.status, result.value) == (rs.SCORE_STATUS_OK, 0.0), (code, result.reason)


@pytest.mark.parametrize(
    "code",
    [
        # The nonce used to be argv[1]: print a passing verdict with it and leave.
        "import sys, os, json\nfor a in sys.argv:\n"
        "    os.write(1, ('\\n' + a + json.dumps({'ran': True, 'passed': True})).encode())\n"
        "os._exit(0)",
        "import builtins\nbuiltins.exec = lambda *a, **k: None",
        "import builtins\nbuiltins.compile = lambda *a, **k: compile('pass', 'x', 'exec')",
    ],
)
def test_forged_verdicts_do_not_pass(reward: Stub, code: str) -> None:
    result = run(reward, code, "assert False, 'the tests must fail'")
    assert (result.status, result.value) == (rs.SCORE_STATUS_OK, 0.0), result.reason


def test_scratch_space_is_bounded(reward: Stub) -> None:
    code = "for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * 900_000)"
    result = run(reward, code, "assert True")
    assert result.status == rs.SCORE_STATUS_ERROR and "scratch" in result.reason, result.reason


def _uid_processes(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uids = next(line for line in status.splitlines() if line.startswith("Uid:"))
        if int(uids.split()[1]) == uid:
            found.append(int(entry.name))
    return found


@pytest.mark.slow  # waits out the sandbox timeout
@pytest.mark.skipif(os.geteuid() != 0, reason="slot uids exist only when the service is root")
def test_no_process_outlives_its_run() -> None:
    """setsid + fork + sleep past the wall clock; the next run in the slot can still fork."""
    sandbox, uid = Sandbox(1, 64900), 64900
    lingering = "import os, time\nos.setsid()\nfor _ in range(3):\n    os.fork()\ntime.sleep(60)"
    forks = "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)"
    limits = Limits(wall_s=1.0, max_processes=8)

    async def both() -> tuple[Status, list[int], float]:
        first = await sandbox.run(lingering, "", limits)
        left = _uid_processes(uid)
        second = await sandbox.run(forks, "assert True", Limits(wall_s=5.0, max_processes=2))
        return first.status, left, second.raw

    status, left, value = asyncio.run(both())
    assert (status, left, value) == (Status.TIMEOUT, [], 1.0)


ESCAPE = """
import json, os
try:
    os.mkdir("esc")
    os.chroot("esc")
    for _ in range(50):
        os.chdir("..")
    os.chroot(".")
except OSError as exc:
    print("refused", exc)
print("ROOT " + json.dumps(sorted(os.listdir("/"))))
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="tlm-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_non_root_sandbox_cannot_climb_out_of_a_chroot(open_dir: Path) -> None:
    """User-namespace mode (service not root): uid 0 inside with no capabilities, pivot_root
    instead of chroot, so the classic chroot escape sees only the sandbox root."""
    python = shutil.which("python3.11", path="/usr/bin") if os.geteuid() == 0 else None
    if os.geteuid() == 0 and python is None:
        pytest.skip("needs a system python a non-root uid can run")
    base = open_dir / "box"
    base.mkdir()
    binds = ["/usr", "/bin", "/lib", "/lib64"]
    config = prepare(base, ESCAPE, "", Limits(), binds, 0, "n" * 32)
    if os.geteuid() == 0:
        config["python"] = python
        for path in [base, *base.rglob("*")]:
            os.chown(path, 65534, 65534)
    as_nobody: dict[str, object] = (
        {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    )
    # The checkout may be private to its owner (a clone under `mktemp -d` is 0700): run a copy
    # of the launcher that uid 65534 can read.
    launcher = open_dir / LAUNCHER.name
    shutil.copyfile(LAUNCHER, launcher)
    launcher.chmod(0o644)
    done = subprocess.run(
        [str(config["python"]), "-I", "-S", str(launcher), json.dumps(config)],
        capture_output=True, text=True, timeout=30, cwd="/", **as_nobody,  # type: ignore[call-overload]
    )  # fmt: skip
    report = read_report(base)
    assert report is not None and "unavailable" not in report, (report, done.stderr)
    listing = next(line for line in done.stdout.splitlines() if line.startswith("ROOT "))
    assert set(json.loads(listing[5:])) <= {"bin", "lib", "lib64", "scratch", "usr"}, listing
    assert "refused" in done.stdout, done.stdout
