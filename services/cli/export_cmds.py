"""`tlm models pull` and `tlm models merge`: a revision out of the registry as a Hugging Face
folder, and a LoRA adapter merged into its base as a new full-weights revision.

The merge runs here, in the CLI's process (peft's `merge_and_unload`, on CPU): it needs the base
and the adapter once, and no service holds a GPU for it. Mounted by services/cli/main.py on
`tlm models`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from services.cli.errors import UserError
from services.cli.registry_cmds import revision_name, run
from services.clients.registry import RegistryClient
from tlm.registry.v1 import registry_pb2 as pb

console = Console()
AddressOpt = Annotated[str | None, typer.Option(help="Registry address.")]
# What the merged folder takes from the base besides the weights: tokenizer and generation files.
BASE_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")


def pull(
    ref: Annotated[str, typer.Argument(help="NAME\\[@REV|@ALIAS]")],
    folder: Annotated[Path, typer.Argument(help="An empty or new folder.")],
    address: AddressOpt = None,
) -> None:
    """Download a revision as a Hugging Face folder (every file checked against its sha256)."""
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty")
    name = revision_name("models", ref)

    async def download(c: RegistryClient) -> pb.ModelRevision:
        revision = await c.get_model_revision(name)
        await c.download_model_revision(revision.name, folder)
        return revision

    revision = run(address, download)
    console.print(
        f"pulled [bold]{revision.name}[/] into {folder} ({revision.manifest.total_bytes} bytes)"
    )


def merge_lora(base: Path, adapter: Path, out: Path) -> None:
    """Write base + adapter, merged, as a full Hugging Face folder (weights in the base's dtype,
    the base's tokenizer and generation config)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    for pattern in BASE_FILES:
        for path in base.glob(pattern):
            if path.name not in WEIGHT_FILES and not (out / path.name).exists():
                shutil.copy2(path, out / path.name)


def merge(
    ref: Annotated[str, typer.Argument(help="ADAPTER\\[@REV|@ALIAS]")],
    out: Annotated[str, typer.Option("--out", help="Model to push the merged revision to.")],
    request_id: Annotated[str, typer.Option(help="Idempotency key for retries.")] = "",
    address: AddressOpt = None,
) -> None:
    """Merge a LoRA adapter into its base model and push the result as a new revision of --out,
    with lineage: the base revision, and the adapter's datasets, job and evaluator."""
    name = revision_name("models", ref)

    async def main(c: RegistryClient) -> pb.ModelRevision:
        adapter = await c.get_model_revision(name)
        if adapter.format != pb.MODEL_FORMAT_LORA_ADAPTER:
            raise UserError(f"{adapter.name} is not a LoRA adapter")
        base_name = adapter.lineage.base_model_revision
        if not base_name:
            raise UserError(f"{adapter.name} names no base model in its lineage")
        with tempfile.TemporaryDirectory(prefix="tlm-merge-") as tmp:
            root = Path(tmp)
            await c.download_model_revision(adapter.name, root / "adapter")
            await c.download_model_revision(base_name, root / "base")
            merge_lora(root / "base", root / "adapter", root / "merged")
            lineage = pb.Lineage()
            lineage.CopyFrom(adapter.lineage)
            await c.create_model(out, exist_ok=True)
            return await c.upload_model_revision(
                f"models/{out}",
                root / "merged",
                lineage=lineage,
                request_id=request_id,
                description=f"{adapter.name} merged into {base_name}",
                labels={"merged_adapter": adapter.name},
            )

    revision = run(address, main)
    console.print(
        f"merged into [bold]{revision.name}[/] (base {revision.lineage.base_model_revision}, "
        f"adapter {revision.labels['merged_adapter']})"
    )
