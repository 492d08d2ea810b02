"""Per-team fair admission: shares worked out by hand, then on a real server with API keys for
two teams (idle streams hold nothing, a team at its share cannot lock another out, idle streams
are closed)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.errors import DeadlineExceeded, ResourceExhausted, TlmError
from services.devtools.server_thread import ServerThread
from services.reward.admission import Admission, StreamClaim
from tests.conftest import API_KEYS
from tests.reward.conftest import start_reward
from tests.reward.helpers import in_flight, sample, spec
from tests.waiting import wait_for
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

A = (("authorization", "Bearer key-team-a"),)
B = (("authorization", "Bearer key-team-b"),)
QUICK = spec({"scorers": [{"name": "yes", "regex": {"pattern": "yes"}}]})


# Admission alone --------------------------------------------------------------------------------


def test_a_team_under_its_share_gets_a_slot_when_another_holds_them_all() -> None:
    """limit 4. A alone: share 4, takes all 4. B arrives: 2 teams, share 4 // 2 = 2, so B gets 2
    although the total (6) is over the limit; A (4 held >= 2, total >= 4) and B's third (2 >= 2)
    are refused. A back to 2: total 4, still no borrowing for anyone."""
    admission = Admission(4, idle_s=60)
    for _ in range(4):
        admission.acquire("a")
    admission.acquire("b")
    admission.acquire("b")
    assert admission.held == {"a": 4, "b": 2} and admission.total == 6
    for team in ("a", "b"):
        with pytest.raises(ResourceExhausted, match="share"):
            admission.acquire(team)
    admission.release("a")
    admission.release("a")
    with pytest.raises(ResourceExhausted):
        admission.acquire("a")
    assert admission.total == 4


def test_a_team_borrows_idle_slots_up_to_the_limit() -> None:
    """limit 4, A and B hold 1 each (share 2): A may borrow until the total is 4 (A holds 3),
    then is refused; B, under its share, still gets a slot."""
    admission = Admission(4, idle_s=60)
    admission.acquire("a")
    admission.acquire("b")
    admission.acquire("a")
    admission.acquire("a")
    with pytest.raises(ResourceExhausted):
        admission.acquire("a")
    admission.acquire("b")
    assert admission.held == {"a": 3, "b": 2}
    for team, count in (("a", 3), ("b", 2)):
        for _ in range(count):
            admission.release(team)
    assert admission.held == {} and admission.total == 0


def test_a_stream_holds_a_slot_only_while_scoring_and_expires_when_idle() -> None:
    async def body() -> tuple[list[int], list[TlmError]]:
        admission = Admission(1, idle_s=0.2)
        expired: list[TlmError] = []
        claim = StreamClaim(admission, "a", on_idle=expired.append)
        held = [admission.total]  # idle: 0
        claim.sample_started()
        claim.sample_started()
        held.append(admission.total)  # two samples, one slot: 1
        await asyncio.sleep(0.3)  # busy: the idle clock is stopped
        claim.sample_done()
        claim.sample_done()
        held.append(admission.total)  # idle again: 0
        await asyncio.sleep(0.3)
        claim.close()
        return held, expired

    held, expired = asyncio.run(body())
    assert held == [0, 1, 0]
    assert len(expired) == 1 and isinstance(expired[0], DeadlineExceeded)
    assert "idle" in expired[0].message


# On a real server -------------------------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An address that accepts TCP connections and never answers: a remote scorer pointed at
    it stays in flight until its timeout, without needing the code sandbox."""
    server = socket.create_server(("127.0.0.1", 0))
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


def slow_spec(address: str, seconds: float) -> rs.ScoreRequest:
    remote: dict[str, object] = {"address": address, "timeout": f"{seconds}s", "max_retries": 0}
    remote["spec"] = {"scorers": [{"name": "x", "math": {}}]}
    return rs.ScoreRequest(spec=spec({"scorers": [{"name": "slow", "remote": remote}]}))


class IdleStream:
    """A StreamScore call that sends its config (and `samples`), then sends nothing until
    `finish()`."""

    def __init__(self, stub: rs_grpc.RewardServiceStub, config: rs.ScoreRequest, *samples: str):
        self._done = threading.Event()

        def requests() -> Iterator[rs.StreamScoreRequest]:
            yield rs.StreamScoreRequest(config=config)
            for sample_id in samples:
                yield rs.StreamScoreRequest(sample=sample(sample_id, "yes"))
            self._done.wait(30)

        self.responses = stub.StreamScore(requests(), metadata=A, timeout=30)

    def finish(self) -> None:
        self._done.set()


def keyed_server(tmp_path: Path, **settings: object) -> ServerThread:
    return start_reward(tmp_path, insecure_dev=False, api_keys=API_KEYS, **settings)


def test_idle_streams_of_one_team_do_not_lock_out_another(tmp_path: Path) -> None:
    """70 open streams of team A, each idle after one sample, hold no slot of the 64: team B's
    Score (and A's own) is answered at once."""
    server = keyed_server(tmp_path)
    streams: list[IdleStream] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            for i in range(70):  # one at a time, so each is idle before the next opens
                stream = IdleStream(stub, rs.ScoreRequest(spec=QUICK), f"s{i}")
                streams.append(stream)
                assert next(iter(stream.responses)).result.sample_id == f"s{i}"
            request = rs.ScoreRequest(spec=QUICK, samples=[sample("b", "yes")])
            for metadata in (B, A):
                start = time.monotonic()
                response = stub.Score(request, metadata=metadata, timeout=10)
                assert response.results[0].reward == 1.0
                assert time.monotonic() - start < 2.5  # not behind A's calls
            for stream in streams:
                stream.finish()
            assert all(list(stream.responses) == [] for stream in streams)
    finally:
        for stream in streams:
            stream.finish()
        server.stop()


@pytest.mark.slow  # holds the rule pool's slots: seconds
def test_a_team_at_its_share_cannot_lock_out_another(tmp_path: Path, blackhole: str) -> None:
    """limit 2: team A's two slow calls (alone, A may use both) hold every slot. B is under its
    share (2 // 2 = 1), so B is admitted at once; A's third call is over its share with every
    slot taken, so it is refused."""
    server = keyed_server(tmp_path, max_concurrent_requests=2)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            slow = slow_spec(blackhole, 6)
            slow.samples.append(sample("slow", "x"))
            workers = [
                threading.Thread(target=lambda: stub.Score(slow, metadata=A, timeout=30))
                for _ in range(2)
            ]
            before = in_flight()
            for worker in workers:
                worker.start()
            # Both are in flight (the remote answers after 6 s).
            wait_for(lambda: in_flight() == before + 2, timeout=5, what="A's two calls admitted")
            quick = rs.ScoreRequest(spec=QUICK, samples=[sample("b", "yes")])
            start = time.monotonic()
            assert stub.Score(quick, metadata=B, timeout=10).results[0].reward == 1.0
            assert time.monotonic() - start < 2.5  # not behind A's calls
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(quick, metadata=A, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "share" in (err.value.details() or "")
            for worker in workers:
                worker.join()
    finally:
        server.stop()


@pytest.mark.slow  # waits out the idle timeout
def test_an_idle_stream_is_closed_after_the_idle_timeout(tmp_path: Path, blackhole: str) -> None:
    """idle 0.5 s. A sample being scored for 1.5 s keeps the stream open (it is not idle);
    0.5 s after its result the stream ends with DEADLINE_EXCEEDED. A stream that never sends
    its config is closed the same way."""
    server = keyed_server(tmp_path, stream_idle_timeout_s=0.5)
    streams: list[IdleStream] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            start = time.monotonic()
            stream = IdleStream(stub, slow_spec(blackhole, 1.5), "slow")
            streams.append(stream)
            first = next(iter(stream.responses)).result
            assert first.sample_id == "slow" and first.status == rs.SCORE_STATUS_ERROR
            assert time.monotonic() - start > 1.4
            with pytest.raises(grpc.RpcError) as err:
                next(iter(stream.responses))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle" in (err.value.details() or "")
            assert time.monotonic() - start < 5

            silent = threading.Event()

            def nothing() -> Iterator[rs.StreamScoreRequest]:
                silent.wait(30)
                yield from ()

            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                list(stub.StreamScore(nothing(), metadata=B, timeout=30))
            silent.set()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle" in (err.value.details() or "")
            assert time.monotonic() - start < 5
    finally:
        for stream in streams:
            stream.finish()
        server.stop()
