"""The code scorer's sandbox, through the API: each escape attempt fails in the expected way
and the service keeps serving afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reward.helpers import code_spec, sample
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

Stub = rs_grpc.RewardServiceStub
LIMITS = {"timeout": "5s", "cpu_seconds": 1, "memory_mb": 256, "max_file_mb": 1}

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
    assert (failing.status, failing.value) == (rs.OK, 0.0)
    partial = rs.ScoreRequest(
        spec=code_spec(**LIMITS, extraction={"code_block": True}),
        samples=[sample("s", code, tests="assert add(1, 2) == 3")],
    )
    assert reward.Score(partial, timeout=30).results[0].reward == 1.0


def test_infinite_loop_is_timeout(reward: Stub) -> None:
    result = run(reward, "while True:\n    pass")
    assert result.status == rs.TIMEOUT and "CPU" in result.reason


def test_sleeping_forever_is_timeout(reward: Stub) -> None:
    result = run(reward, "import time\ntime.sleep(60)", timeout="1s")
    assert result.status == rs.TIMEOUT and "wall-clock" in result.reason


def test_unbounded_allocation_is_error(reward: Stub) -> None:
    result = run(reward, "x = []\nwhile True:\n    x.append(' ' * 10**7)")
    assert result.status == rs.ERROR and "memory" in result.reason


def test_fork_bomb_is_stopped(reward: Stub) -> None:
    result = run(reward, "import os\nwhile True:\n    os.fork()", max_processes=8)
    assert result.status in (rs.ERROR, rs.TIMEOUT), result
    assert "process" in result.reason or result.status == rs.TIMEOUT


def test_huge_file_is_error(reward: Stub) -> None:
    result = run(reward, "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10**6)")
    assert result.status == rs.ERROR and "file size" in result.reason


def test_secrets_and_files_outside_scratch_are_unreadable(reward: Stub, tmp_path: Path) -> None:
    outside = tmp_path / "host-secret.txt"
    outside.write_text("secret")
    outside.chmod(0o644)  # world-readable on the host: only the mount namespace hides it
    for path in ["/etc/shadow", "/etc/passwd", str(outside), os.path.abspath("README.md")]:
        result = refused(reward, f"open({path!r}).read()")
        assert (result.status, result.value) == (rs.OK, 1.0), (path, result.reason)


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
    assert reward.Score(request, timeout=30).results[0].status == rs.UNSCORABLE


def test_service_keeps_serving_after_escapes(reward: Stub) -> None:
    assert run(reward, "def f():\n    return 1", "assert f() == 1").value == 1.0
