"""The outage guard alone (`rl/outage.py`): which errors it waits through, the events it
records, its timeout and a cancel while it waits. The services going down for real is
`test_rl_outages.py`."""

from __future__ import annotations

import time

import grpc
import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.trainer.rl.outage import Endpoint, OutageGuard, ServiceOutage, is_outage
from services.trainer.worker_io import Cancelled

REWARD = Endpoint("reward", "127.0.0.1:7")


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")


class Flaky:
    """Fails with each of `errors` in turn, then answers `value`."""

    def __init__(self, *errors: Exception, value: str = "ok") -> None:
        self.errors, self.value, self.calls = list(errors), value, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def guard(timeout_s: float = 30.0, stop: list[bool] | None = None) -> tuple[OutageGuard, list]:
    events: list[tuple[str, str]] = []

    def check_stop() -> None:
        if stop and stop[0]:
            raise Cancelled()

    return OutageGuard(timeout_s, lambda m, level: events.append((level, m)), check_stop), events


def test_what_counts_as_an_outage() -> None:
    assert is_outage(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert is_outage(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert is_outage(Unavailable("the reward service is down"))  # as a client maps it
    assert not is_outage(rpc_error(grpc.StatusCode.INVALID_ARGUMENT))
    assert not is_outage(InvalidArgument("bad"))
    assert not is_outage(ServiceOutage("the guard's own verdict"))


async def test_waits_through_an_outage_and_reports_it() -> None:
    g, events = guard()
    call = Flaky(
        rpc_error(grpc.StatusCode.UNAVAILABLE),
        Unavailable("still down"),
        rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED),
    )
    assert await g.call(REWARD, call) == "ok" and call.calls == 4
    assert [level for level, _ in events] == ["warning", "info"]
    assert events[0][1].startswith("waiting for reward at 127.0.0.1:7 (UNAVAILABLE: down)")
    assert events[1][1].startswith("reward at 127.0.0.1:7 answered again after")
    assert g.waits and g.waits[0][0] == REWARD


async def test_a_service_back_with_an_error_ends_the_wait_and_raises_it() -> None:
    """A restarted rollout answers, but without the policy (FAILED_PRECONDITION): the wait is
    over (the loop serves the policy again), and the error is the caller's."""
    g, events = guard()
    call = Flaky(rpc_error(grpc.StatusCode.UNAVAILABLE), rpc_error(grpc.StatusCode.NOT_FOUND))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await g.call(REWARD, call)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and call.calls == 2
    assert [level for level, _ in events] == ["warning", "info"]


async def test_other_errors_are_not_retried() -> None:
    g, events = guard()
    call = Flaky(rpc_error(grpc.StatusCode.INVALID_ARGUMENT))
    with pytest.raises(grpc.aio.AioRpcError):
        await g.call(REWARD, call)
    assert call.calls == 1 and events == []


async def test_fails_naming_the_service_after_the_timeout() -> None:
    g, events = guard(timeout_s=0.3)
    call = Flaky(*[rpc_error(grpc.StatusCode.UNAVAILABLE)] * 1000)
    started = time.monotonic()
    with pytest.raises(ServiceOutage) as err:
        await g.call(REWARD, call)
    assert 0.3 <= time.monotonic() - started < 5 and call.calls >= 2
    assert "the reward service at 127.0.0.1:7 was unreachable" in err.value.message
    assert "outage_timeout_s (0.3 s)" in err.value.message
    assert err.value.metadata == {"service": "reward", "address": "127.0.0.1:7"}
    assert len(events) == 1  # waiting, never "answered again"


async def test_a_cancel_ends_the_wait() -> None:
    stop = [False]
    g, _ = guard(timeout_s=600, stop=stop)

    async def down() -> str:
        stop[0] = True  # cancelled while the service is down
        raise rpc_error(grpc.StatusCode.UNAVAILABLE)

    with pytest.raises(Cancelled):
        await g.call(REWARD, down)
