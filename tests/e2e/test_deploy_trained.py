"""A model trained by the trainer (LoRA SFT on chat rows, as `make demo` trains) is deployed
(base + the trained adapter) and answers the official `openai` client through the gateway,
streaming included, with every service real and in one `tlm up` server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from services.clients.deploy import DeployClient
from services.clients.registry import RegistryClient
from services.clients.trainer import TrainerClient
from services.devtools.demo import addition_chat_rows
from services.devtools.gateway_thread import GatewayThread
from services.devtools.server_thread import ServerThread
from services.gateway.settings import GatewaySettings
from tlm.deploy.v1 import deploy_pb2
from tlm.registry.v1 import registry_pb2
from tlm.trainer.v1 import trainer_pb2 as pb

pytestmark = pytest.mark.slow
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is 2 + 3?"}]


async def train_adapter(address: str, tiny_model_dir: Path, tmp_path: Path) -> tuple[str, str]:
    """(base revision, the trained adapter revision)."""
    rows = tmp_path / "chat.jsonl"
    rows.write_text(addition_chat_rows(4))  # what `make demo` trains on, fewer
    async with RegistryClient(address, insecure=True) as registry:
        await registry.create_model("e2e-deploy-base", exist_ok=True)
        base = await registry.upload_model_revision("models/e2e-deploy-base", tiny_model_dir)
        chat = await registry.upload_dataset_file(
            "datasets/e2e-deploy-chat", rows, registry_pb2.DATASET_KIND_SFT
        )
    spec = pb.TrainingJobSpec(
        method=pb.METHOD_SFT,
        base_model=base.name,
        train_dataset=chat.name,
        tuning=pb.Tuning(lora=pb.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
        training=pb.TrainingParams(
            max_steps=4, per_device_batch_size=4, max_length=48, save_every=0, learning_rate=3e-3
        ),
        output_model="models/e2e-deploy-lora",
    )
    async with TrainerClient(address, insecure=True) as trainer:
        job = await trainer.create_job(pb.CreateTrainingJobRequest(spec=spec))
        deadline = time.monotonic() + 300
        while job.state not in (pb.TrainingJob.STATE_SUCCEEDED, pb.TrainingJob.STATE_FAILED):
            assert time.monotonic() < deadline, "the SFT job did not finish"
            job = await trainer.get_job(job.name)
            await asyncio.sleep(0.3)  # a poll, as tests/trainer/conftest.py's wait_for
    assert job.state == pb.TrainingJob.STATE_SUCCEEDED, job.error
    return base.name, job.output_model_revision


async def test_trained_adapter_deployed_answers_the_openai_client(
    embedded: ServerThread, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base, adapter = await train_adapter(embedded.address, tiny_model_dir, tmp_path)
    async with DeployClient(embedded.address, insecure=True) as deploy:
        await deploy.create_deployment(
            "e2e-chat", deploy_pb2.Deployment(model=base, adapter=adapter)
        )
        states: list[deploy_pb2.Deployment] = []

        async def read() -> None:
            states.append(await deploy.get_deployment("deployments/e2e-chat"))

        deadline = time.monotonic() + 120
        await read()
        while states[-1].state == deploy_pb2.Deployment.STATE_PENDING:
            assert time.monotonic() < deadline, "the deployment stayed PENDING"
            await asyncio.sleep(0.05)
            await read()
    ready = states[-1]
    assert ready.state == deploy_pb2.Deployment.STATE_READY, ready.state_reason
    assert (ready.model_revision, ready.adapter_revision) == (base, adapter)

    settings = GatewaySettings(host="127.0.0.1", port=0, insecure_dev=True)
    gateway = GatewayThread(settings, embedded.address).start()
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="any", max_retries=0)
        whole = client.chat.completions.create(
            model="e2e-chat",
            messages=QUESTION,
            temperature=0,
            max_tokens=8,
        )
        assert whole.system_fingerprint == f"{base}+{adapter}"
        text = whole.choices[0].message.content
        assert text
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="e2e-chat",
                messages=QUESTION,
                temperature=0,
                max_tokens=8,
                stream=True,
            )
            if chunk.choices
        )
        assert streamed == text
    finally:
        gateway.stop()
