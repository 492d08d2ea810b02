"""Security review fixes for rule scorers: JSON Schema references stay inside the schema,
patterns run on RE2, and a rule worker that overruns is killed and replaced."""

from __future__ import annotations

import asyncio
import http.server
import json
import multiprocessing
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from structlog.testing import capture_logs

from services.reward.domain import Outcome, Sample, Status
from services.reward.rule_runner import RuleRunner
from services.reward.rules import score_rule
from services.specs import json_schema
from services.specs.json_schema import SafeValidator, SchemaUnusable, check_schema
from tests.reward.conftest import start_reward
from tests.reward.helpers import sample, spec
from tlm.reward.v1 import evaluator_pb2 as ev
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.reward.v1 import reward_service_pb2_grpc as rs_grpc

SECRET = "TOPSECRET-7f3a"
# `uniqueItems` compares distinct objects pairwise in jsonschema: 20,000 of them take minutes
# of CPU (1,000 take about 1.5 s), a genuinely slow rule sample that RE2 does not help with.
SLOW = json.dumps([{"a": i} for i in range(20_000)])
MEDIUM = json.dumps([{"a": i} for i in range(300)])  # ~80 ms of CPU under UNIQUE
UNIQUE: dict[str, Any] = {"uniqueItems": True}
EVIL = "^(a+)+$"
EVIL_TEXT = "a" * 26 + "!"  # about 2 s in Python's re, and doubling with each "a"


def json_scorer(schema: dict[str, Any], timeout_s: int = 10) -> ev.ScorerSpec:
    scorer = ev.ScorerSpec(name="j")
    scorer.json.schema.update(schema)
    scorer.timeout.seconds = timeout_s
    return scorer


def score(schema: dict[str, Any], text: str) -> Outcome:
    return score_rule(json_scorer(schema), Sample("s", text))


# 1. References stay inside the schema -------------------------------------------------------


@pytest.fixture
def schema_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 that serves a schema holding SECRET; yields (url, paths)."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = json.dumps({"const": SECRET}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/schema+json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/schema.json", requests
    finally:
        server.shutdown()
        server.server_close()


def test_http_ref_is_refused_without_a_request(schema_server: tuple[str, list[str]]) -> None:
    url, requests = schema_server
    direct = score({"$ref": url}, "1")
    # Reached only through a pointer into an unknown keyword: refused when used.
    behind_pointer = score({"$ref": "#/x", "x": {"$ref": url}}, "1")
    for outcome in (direct, behind_pointer):
        assert outcome.status == Status.ERROR, outcome
        assert "does not resolve inside the schema" in outcome.reason
        assert SECRET not in outcome.reason
    assert requests == []


def test_file_ref_is_refused_and_the_file_not_read(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret.json"
    secret_file.write_text(json.dumps({"const": SECRET}))
    outcome = score({"$ref": secret_file.as_uri()}, '"guess"')
    assert outcome.status == Status.ERROR and SECRET not in outcome.reason
    assert secret_file.as_uri() in outcome.reason


def test_ref_to_a_server_that_never_answers_does_not_block() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # connections complete in the backlog; nothing ever answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/s.json"
    got: list[Outcome] = []
    worker = threading.Thread(target=lambda: got.append(score({"$ref": url}, "1")), daemon=True)
    try:
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "scoring blocked on the reference"
        assert got[0].status == Status.ERROR
    finally:
        listener.close()


def test_in_document_refs_and_bundled_metaschemas_still_work() -> None:
    schema = {
        "$defs": {"pos": {"type": "integer", "minimum": 1}},
        "properties": {"n": {"$ref": "#/$defs/pos"}},
    }
    assert score(schema, '{"n": 3}') == Outcome.ok(1.0)
    assert score(schema, '{"n": 0}').raw == 0.0
    metaschema = {"$ref": "https://json-schema.org/draft/2020-12/schema"}
    assert score(metaschema, '{"type": "string"}') == Outcome.ok(1.0)


def test_score_api_refuses_external_ref(reward: Any, schema_server: tuple[str, list[str]]) -> None:
    url, requests = schema_server
    request = rs.ScoreRequest(
        spec=spec({"scorers": [{"name": "j", "json": {"schema": {"$ref": url}}}]}),
        samples=[sample("a", '"x"')],
    )
    # The spec check is the scorer's own, so the spec is refused before anything is scored
    # (specs stored before that check still score ERROR: the unit tests above).
    with pytest.raises(grpc.RpcError) as err:
        reward.Score(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert "scorers[0].json.schema" in details and SECRET not in details
    assert requests == []


# 2. Patterns run on RE2 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        {"pattern": EVIL},
        {"properties": {"k": {"pattern": EVIL}}},
        # A nested $schema would switch jsonschema to its stock draft-07 class (and `re`).
        {"properties": {"k": {"$schema": "http://json-schema.org/draft-07/schema#",
                              "pattern": EVIL}}},
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": {"t": {
            "$schema": "https://json-schema.org/draft/2020-12/schema", "pattern": EVIL}},
         "properties": {"k": {"$ref": "#/$defs/t"}}},
    ],
    ids=["pattern", "nested", "draft-07-subschema", "2020-12-subschema"],
)  # fmt: skip
def test_catastrophic_pattern_is_linear(schema: dict[str, Any]) -> None:
    for text in (EVIL_TEXT, "a" * 200_000 + "!"):  # the short one first: `re` takes seconds
        start = time.monotonic()
        outcome = score(schema, json.dumps({"k": text} if "properties" in schema else text))
        assert time.monotonic() - start < 1.0
        assert outcome.status == Status.OK and outcome.raw == 0.0
        assert "does not match" in outcome.reason and len(outcome.reason) <= 500


@pytest.mark.parametrize(
    "schema",
    [
        {"patternProperties": {EVIL: {"type": "integer"}}, "additionalProperties": False},
        {"patternProperties": {EVIL: {"type": "integer"}}, "unevaluatedProperties": False},
        {"allOf": [{"patternProperties": {EVIL: {}}}], "unevaluatedProperties": False},
    ],
    ids=["additional", "unevaluated", "unevaluated-through-allOf"],
)
def test_catastrophic_pattern_properties_are_linear(schema: dict[str, Any]) -> None:
    start = time.monotonic()
    outcome = score(schema, json.dumps({EVIL_TEXT: 1, "aaa": 2}))
    assert time.monotonic() - start < 1.0
    assert (outcome.status, outcome.raw) == (Status.OK, 0.0)
    assert repr(EVIL_TEXT) in outcome.reason and "'aaa'" not in outcome.reason


@pytest.mark.parametrize(
    "schema",
    [{"pattern": "(a)\\1"}, {"patternProperties": {"(?<=a)b": {}}}, {"properties": {"x": {
        "pattern": "(?=y)"}}}],
    ids=["backreference", "lookbehind-key", "unused-lookahead"],
)  # fmt: skip
def test_pattern_re2_refuses_is_an_error_not_a_fallback(schema: dict[str, Any]) -> None:
    outcome = score(schema, '{"y": "aa"}')
    assert outcome.status == Status.ERROR
    assert "not valid RE2" in outcome.reason


CASES: list[tuple[dict[str, Any], Any]] = [
    ({"pattern": "^a+$"}, "aaa"),
    ({"pattern": "^a+$"}, "ab"),
    ({"pattern": "b"}, 5),
    ({"patternProperties": {"^x": {"type": "integer"}}}, {"x1": 1, "x2": "s", "y": None}),
    ({"properties": {"a": {}}, "patternProperties": {"^x": {}}, "additionalProperties": False},
     {"a": 1, "x": 2, "zz": 3, "yy": 4}),
    ({"properties": {"a": {}}, "additionalProperties": {"type": "string"}}, {"a": 1, "b": 2}),
    ({"additionalProperties": False}, {"c": 1, "b": 2}),
    ({"allOf": [{"properties": {"a": {}}}], "patternProperties": {"^p": {}},
      "unevaluatedProperties": False}, {"a": 1, "p1": 2, "q": 3, "b": 4}),
    ({"$defs": {"base": {"properties": {"id": {}}}}, "$ref": "#/$defs/base",
      "unevaluatedProperties": False}, {"id": 1, "x": 2}),
    ({"if": {"required": ["k"]}, "then": {"properties": {"k": {}}},
      "else": {"properties": {"e": {}}}, "unevaluatedProperties": {"type": "string"}},
     {"k": 1, "z": 2}),
    ({"dependentSchemas": {"d": {"properties": {"x": {}}}}, "unevaluatedProperties": False},
     {"d": 1, "x": 2}),
    ({"anyOf": [{"patternProperties": {"^a": {}}}, {"properties": {"b": {}}}],
      "unevaluatedProperties": False}, {"a1": 1, "b": 2}),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "instance"), CASES)
def test_re2_keywords_agree_with_jsonschema(schema: dict[str, Any], instance: Any) -> None:
    """On patterns both engines run alike, the RE2 keywords give jsonschema's own answers."""
    stock = jsonschema.Draft202012Validator(schema, registry=json_schema.LOCAL_ONLY)
    ours = SafeValidator(schema, registry=json_schema.LOCAL_ONLY)
    assert ours.is_valid(instance) == stock.is_valid(instance)
    assert sorted(e.message for e in ours.iter_errors(instance)) == sorted(
        e.message for e in stock.iter_errors(instance)
    )


def test_check_schema_for_spec_validation() -> None:
    check_schema({"$defs": {"a": {"pattern": "^x$"}}, "properties": {"k": {"$ref": "#/$defs/a"}}})
    with pytest.raises(jsonschema.SchemaError) as bad:
        check_schema({"properties": {"k": {"pattern": "(?=y)"}}})
    assert list(bad.value.absolute_path) == ["properties", "k", "pattern"]
    with pytest.raises(jsonschema.SchemaError) as bad:
        check_schema({"patternProperties": {"(a)\\1": {}}})
    assert list(bad.value.absolute_path) == ["patternProperties"]
    with pytest.raises(SchemaUnusable, match="does not resolve inside the schema"):
        check_schema({"anyOf": [{"type": "string"}, {"$ref": "http://127.0.0.1:9/s.json"}]})


# 3. Rule workers that overrun are killed and replaced ----------------------------------------


def statuses(results: list[tuple[Outcome, float]]) -> list[str]:
    return [outcome.status.name for outcome, _ in results]


def alive(pids: list[int], expect: int = 0, within: float = 2.0) -> list[int]:
    """Those of `pids` still running once `expect` are left or `within` seconds pass (a
    SIGKILLed process takes a moment to go)."""
    end = time.monotonic() + within
    while True:
        left = sorted(p.pid for p in multiprocessing.active_children() if p.pid in pids)
        if len(left) <= expect or time.monotonic() > end:
            return left
        time.sleep(0.02)


@pytest.mark.slow  # waits out rule deadlines and worker kills
def test_overrunning_sample_is_killed_and_its_chunk_goes_on() -> None:
    scorer = json_scorer(UNIQUE, timeout_s=1)
    quick = [Sample("q", "[1, 2]")]

    async def body() -> None:
        runner = RuleRunner(2)
        try:
            await runner.warm_up()
            first = runner.worker_pids()
            samples = [Sample("a", "[1, 2]"), Sample("slow", SLOW), Sample("b", "[1, 1]")]
            start = time.monotonic()
            results = await runner.run(scorer, samples, timeout_s=1.0, deadline=start + 30)
            assert time.monotonic() - start < 8  # the 1 s timeout and a kill, not the deadline
            assert statuses(results) == ["OK", "TIMEOUT", "OK"]
            assert [o.raw for o, _ in results] == [1.0, 0.0, 0.0]
            assert "killed" in results[1][0].reason
            assert len(alive(first, expect=1)) == 1  # the slow sample's worker is gone
            start = time.monotonic()
            again = await runner.run(scorer, quick, timeout_s=1.0, deadline=start + 30)
            assert statuses(again) == ["OK"] and time.monotonic() - start < 2
        finally:
            runner.close()

    asyncio.run(body())


@pytest.mark.slow  # waits out rule deadlines and worker kills
def test_request_deadline_kills_the_worker() -> None:
    scorer = json_scorer(UNIQUE, timeout_s=60)

    async def body() -> None:
        runner = RuleRunner(1)
        try:
            await runner.warm_up()
            first = runner.worker_pids()
            start = time.monotonic()
            samples = [Sample("slow", SLOW), Sample("after", "[1]")]
            results = await runner.run(scorer, samples, timeout_s=60, deadline=start + 1)
            assert time.monotonic() - start < 5  # the deadline and a kill, not the 60 s timeout
            assert statuses(results) == ["TIMEOUT", "TIMEOUT"]
            assert "deadline" in results[0][0].reason
            assert alive(first) == []
        finally:
            runner.close()

    asyncio.run(body())


@pytest.mark.slow  # waits out rule deadlines and worker kills
def test_close_kills_a_running_worker_at_once() -> None:
    scorer = json_scorer(UNIQUE, timeout_s=60)

    async def body() -> None:
        runner = RuleRunner(2)
        await runner.warm_up()
        pids = runner.worker_pids()
        long = runner.run(scorer, [Sample("slow", SLOW)], timeout_s=60, deadline=1e12)
        task = asyncio.ensure_future(long)
        await asyncio.sleep(0.5)
        start = time.monotonic()
        runner.close()
        assert time.monotonic() - start < 3
        assert alive(pids) == []
        results = await asyncio.wait_for(task, 3)
        assert statuses(results) == ["ERROR"] and "stopping" in results[0][0].reason

    asyncio.run(body())


@pytest.mark.slow  # waits out rule deadlines and worker kills
def test_cancelled_call_kills_its_worker() -> None:
    scorer = json_scorer(UNIQUE, timeout_s=60)

    async def body() -> None:
        runner = RuleRunner(1)
        try:
            await runner.warm_up()
            first = runner.worker_pids()
            call = runner.run(scorer, [Sample("slow", SLOW)], timeout_s=60, deadline=1e12)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(call, 0.5)
            await asyncio.sleep(0.5)
            assert alive(first) == []
            results = await runner.run(
                scorer, [Sample("q", "[1]")], timeout_s=60, deadline=time.monotonic() + 60
            )
            assert statuses(results) == ["OK"]
        finally:
            runner.close()

    asyncio.run(body())


@pytest.mark.slow  # waits out rule deadlines and worker kills
def test_thread_mode_returns_at_the_deadline() -> None:
    """A thread cannot be killed: the result comes back TIMEOUT on time, the thread runs on."""
    scorer = json_scorer(UNIQUE, timeout_s=1)
    medium = json.dumps([{"a": i} for i in range(1_500)])  # a few seconds of CPU

    async def body() -> None:
        runner = RuleRunner(0)
        start = time.monotonic()
        results = await runner.run(
            scorer, [Sample("m", medium)], timeout_s=0.2, deadline=time.monotonic() + 30
        )
        assert time.monotonic() - start < 1
        assert statuses(results) == ["TIMEOUT"]
        runner.close()

    asyncio.run(body())  # waits for the thread at the end (loop.shutdown_default_executor)


def test_zero_rule_workers_warn_that_rules_run_in_the_server() -> None:
    """One hostile math answer can hold the server's GIL when rules run in its thread: an
    operator who sets zero workers is told so at start; with workers, nothing is said."""
    with capture_logs() as logs:
        RuleRunner(0).close()
    warned = [e for e in logs if e["event"] == "rule_scorers_in_server_thread"]
    assert [e["log_level"] for e in warned] == ["warning"]
    assert "trusted input only" in warned[0]["why"]
    with capture_logs() as logs:
        RuleRunner(1).close()
    assert not [e for e in logs if e["event"] == "rule_scorers_in_server_thread"]


@pytest.mark.slow  # waits out rule deadlines and worker kills
def test_stuck_rule_worker_does_not_hold_the_server(tmp_path: Path) -> None:
    before = {p.pid for p in multiprocessing.active_children()}
    keys = {"key-a": "team-a", "key-b": "team-b"}
    server = start_reward(tmp_path, rule_workers=2, api_keys=keys)
    workers = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    slow_spec = {"scorers": [{"name": "j", "timeout": "1s", "json": {"schema": UNIQUE}}]}
    quick_spec = {"scorers": [{"name": "r", "regex": {"pattern": "^ok$"}}]}
    try:
        assert len(workers) == 2
        with grpc.insecure_channel(server.address) as channel:
            stub = rs_grpc.RewardServiceStub(channel)
            slow = rs.ScoreRequest(
                spec=spec(slow_spec), samples=[sample("slow", SLOW), sample("fine", "[1]")]
            )
            got = stub.Score(slow, timeout=30, metadata=[("x-api-key", "key-a")]).results
            assert [r.status for r in got] == [rs.SCORE_STATUS_TIMEOUT, rs.SCORE_STATUS_OK]
            assert len(alive(workers, expect=1)) == 1  # the stuck one was killed, not left spinning
            start = time.monotonic()
            quick = rs.ScoreRequest(spec=spec(quick_spec), samples=[sample("q", "ok")])
            result = stub.Score(quick, timeout=30, metadata=[("x-api-key", "key-b")]).results[0]
            assert result.status == rs.SCORE_STATUS_OK and result.reward == 1.0
            assert time.monotonic() - start < 2
            # A second stuck sample on the remaining worker: the pool still recovers.
            again = stub.Score(slow, timeout=30, metadata=[("x-api-key", "key-a")]).results
            assert [r.status for r in again] == [rs.SCORE_STATUS_TIMEOUT, rs.SCORE_STATUS_OK]
            after = stub.Score(quick, timeout=30, metadata=[("x-api-key", "key-b")]).results
            assert after[0].status == rs.SCORE_STATUS_OK
            workers += [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    finally:
        start = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - start
    assert stopped_in < 5
    assert alive(workers) == []
