"""The console in a real headless Chromium (tests/node/console_flow.mjs, puppeteer-core with
@sparticuz/chromium's bundled binary: no download at test time) against the gateway and the
embedded services: the whole create-a-job flow a new user follows, checked against the
services' own answers. Its screenshots go to a temporary folder; with
TLM_UPDATE_SCREENSHOTS=1 they replace the README's (docs/)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.clients import RegistryClient, RewardClient, TrainerClient
from tests.console.conftest import KEY, Stack
from tlm.reward.v1 import reward_service_pb2 as rs
from tlm.trainer.v1 import trainer_pb2 as pb

NODE_DIR = Path(__file__).parents[1] / "node"
DOCS = Path(__file__).parents[2] / "docs"
PROMPTS = [
    {"prompt": f"What is {a} + {b}?", "reference": str(a + b)} for a in (1, 2) for b in (1, 2, 3, 4)
]
BAD = [{"prompt": "What is 1 + 1?"}, {"reference": "2"}, {"prompt": 7}]  # rows 1 and 2 are bad


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def flow(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is required for the browser test (make test installs it)")
    if not (NODE_DIR / "node_modules" / "@sparticuz" / "chromium").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)
    tmp = tmp_path_factory.mktemp("browser")
    good, bad = _jsonl(tmp / "arith.jsonl", PROMPTS), _jsonl(tmp / "bad.jsonl", BAD)
    shots = DOCS if os.environ.get("TLM_UPDATE_SCREENSHOTS") == "1" else tmp / "shots"
    shots.mkdir(exist_ok=True)
    args = [node, "console_flow.mjs", stack.console, KEY, str(good), str(bad), str(shots)]
    proc = subprocess.run(args, cwd=NODE_DIR, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    out["shots"] = str(shots)
    return out


@pytest.mark.slow
def test_signs_in_and_uploads_with_row_errors_shown_per_row(flow: dict[str, Any]) -> None:
    assert flow["after_login"] == "/console/models"
    assert [e["row"] for e in flow["row_errors"]] == [1, 2]
    assert (
        flow["row_errors"][0]["cells"][0] == "2" and "prompt" in flow["row_errors"][0]["cells"][1]
    )
    assert (
        "datasets/arith/revisions/" in flow["uploaded"]
        and f"{len(PROMPTS)} rows" in flow["uploaded"]
    )
    assert ["datasets/arith", str(len(PROMPTS))] in flow["prompt_rows"]
    assert "prompt" in flow["data_notice_grpo"]


@pytest.mark.slow
def test_evaluator_built_by_clicking_is_what_the_reward_service_normalises(
    stack: Stack, flow: dict[str, Any]
) -> None:
    invalid, message = flow["pattern_error"]
    assert invalid == "true" and message  # the error sits at scorers[0].regex.pattern
    built = json.loads(flow["built_json"])
    assert built == {"scorers": [{"name": "regex-1", "regex": {"pattern": "[0-9]"}}]}

    async def normalised() -> rs.ValidateEvaluatorResponse:
        async with RewardClient(stack.server.address, api_key=KEY) as reward:
            return await reward.validate_evaluator(flow["built_json"])

    response = asyncio.run(normalised())
    assert response.valid and flow["normalized_shown"] == response.normalized_json


@pytest.mark.slow
def test_creates_a_grpo_job_and_watches_its_reward_curve(
    stack: Stack, flow: dict[str, Any]
) -> None:
    assert flow["beta_error"].startswith("must be in [0, 10]")  # validate_only, at its field
    assert flow["checked"].startswith(("The trainer accepts", "No problems found")), flow["checked"]
    assert flow["estimate"].startswith("Fits")
    assert flow["unlabeled"] == []
    job_name = flow["job_path"].removeprefix("/console/")

    async def read() -> tuple[pb.TrainingJob, list[Any]]:
        async with TrainerClient(stack.server.address, api_key=KEY) as trainer:
            job = await trainer.get_job(job_name)
            events = [e async for e in trainer.watch(job_name)]
        return job, events

    job, events = asyncio.run(read())
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED and flow["state"] == "SUCCEEDED"
    assert job.spec.method == pb.METHOD_GRPO and job.spec.evaluator.startswith("evaluators/digits/")
    assert job.spec.training.max_steps == 3 and job.spec.grpo.sampling.max_tokens == 6
    assert flow["output"] == job.output_model_revision
    rewards = [
        (e.metrics.step, e.metrics.values["reward_mean"])
        for e in events
        if e.WhichOneof("event") == "metrics" and "reward_mean" in e.metrics.values
    ]
    curve = flow["reward_curve"]
    assert rewards and list(zip(curve["steps"], curve["values"], strict=True)) == rewards
    assert curve["canvas"] and curve["canvas"][0] > 0  # uPlot drew it
    assert flow["samples"] > 0  # the completions logged with the metrics
    assert any(job.output_model_revision in line and job_name in line for line in flow["lineage"])
    shots = Path(flow["shots"])
    assert (shots / "console-create-job.png").stat().st_size > 10_000
    assert (shots / "console-job.png").stat().st_size > 10_000


@pytest.mark.slow
def test_review_answered_in_the_page_is_stored(stack: Stack, flow: dict[str, Any]) -> None:
    assert len(flow["reviews_before"]) == 1 and "chose B" in flow["review_answer"]

    async def read() -> tuple[list[rs.Review], list[dict[str, Any]]]:
        async with RewardClient(stack.server.address, api_key=KEY) as reward:
            answered = await reward.list_reviews(rs.Review.STATE_ANSWERED)
        async with RegistryClient(stack.server.address, api_key=KEY) as registry:
            rows = [
                r
                async for r in registry.read_dataset_rows("datasets/console-prefs/revisions/latest")
            ]
        return answered, rows

    answered, rows = asyncio.run(read())
    assert [r.answer.chosen_index for r in answered] == [1]
    assert rows == [{"prompt": "What is 2 + 2?", "chosen": "five", "rejected": "4"}]


@pytest.mark.slow
def test_pages_fit_a_narrow_window_without_script_errors(flow: dict[str, Any]) -> None:
    assert flow["page_errors"] == []
    assert all(width <= 380 for width in flow["narrow"].values()), flow["narrow"]
