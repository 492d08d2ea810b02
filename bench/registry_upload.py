"""Registry throughput: a ~200 MB artifact uploaded and downloaded through the service vs a
plain file copy on the same disk, and dataset validation speed in rows/s.

The peer the target is set against is the read/write copy: read() and write() of the same bytes
in 4 MiB blocks in user space, as any program that sees the bytes must do (the in-kernel copy,
sendfile/copy_file_range, is printed for scale only). The peer neither hashes nor fsyncs, and
its copy is deleted each round; the registry hashes (sha256 on both sides), fsyncs each blob
before renaming it into place, and keeps every blob.

Each round runs the four transfers (in-kernel copy, read/write copy, upload, download) in a
rotating order, so load on the machine hits every side alike; each round uploads a fresh
revision (the artifact's first bytes change, so nothing is deduplicated). Prints the median and
spread (min-max) of each rate over `--repeats` rounds, and of its ratio to the read/write copy
within each round (target >= 0.5).

    .venv/bin/python bench/registry_upload.py [--mb 200] [--repeats 5] [--rows 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.clients.registry import RegistryClient
from services.devtools.server_process import start_service, stop_service
from services.registry.datasets import validate_file
from tlm.registry.v1 import registry_pb2


def _make_artifact(folder: Path, mb: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["Bench"], "model_type": "x"}))
    with (folder / "model.bin").open("wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1024 * 1024))
    return folder


def _kernel_copy(src: Path, dst: Path) -> float:
    """shutil.copytree: sendfile/copy_file_range, bytes never enter user space."""
    start = time.perf_counter()
    shutil.copytree(src, dst)
    return time.perf_counter() - start


def _userspace_copy(src: Path, dst: Path) -> float:
    """read()/write() in 4 MiB blocks: what any program that sees the bytes must do."""
    start = time.perf_counter()
    dst.mkdir()
    for p in src.iterdir():
        with p.open("rb") as a, (dst / p.name).open("wb") as b:
            while block := a.read(4 << 20):
                b.write(block)
    return time.perf_counter() - start


class Service:
    """A registry client; `upload` then `download` of the revision it made, per round."""

    def __init__(self, address: str) -> None:
        self.client = RegistryClient(address)
        self.revision = ""

    async def upload(self, src: Path) -> float:
        start = time.perf_counter()
        self.revision = (await self.client.upload_model_revision("models/bench", src)).name
        return time.perf_counter() - start

    async def download(self, dest: Path) -> float:
        start = time.perf_counter()
        await self.client.download_model_revision(self.revision, dest)
        return time.perf_counter() - start


async def _rounds(address: str, src: Path, root: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds per round for each side, the order rotating each round."""
    service = Service(address)
    sides: dict[str, Callable[[Path], Awaitable[float]]] = {
        "in-kernel copy": lambda out: asyncio.to_thread(_kernel_copy, src, out),
        "read/write copy": lambda out: asyncio.to_thread(_userspace_copy, src, out),
        "upload": lambda _out: service.upload(src),
        "download": service.download,
    }
    names = list(sides)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(repeats + 1):  # round 0 warms up and is not counted
            with (src / "model.bin").open("r+b") as f:
                f.write(os.urandom(16))  # a new sha256: the upload stores a new blob
            # The download must follow the upload of its round.
            order = names[r % 2 :] + names[: r % 2]
            if order.index("download") < order.index("upload"):
                order.remove("download")
                order.append("download")
            for name in order:
                out = root / f"out-{name.replace('/', '')}"
                took = await sides[name](out)
                shutil.rmtree(out, ignore_errors=True)
                if r:
                    seconds[name].append(took)
    finally:
        await service.client.close()
    return seconds


def _rows(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            row = {
                "prompt": f"What is {i} + {i}? Think step by step.",
                "chosen": f"{2 * i}",
                "rejected": f"{2 * i + 1}",
            }
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlm-bench-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        src = _make_artifact(root / "src", args.mb)
        size_mb = sum(p.stat().st_size for p in src.rglob("*")) / 2**20
        # The service runs in its own process, as deployed: client and server share no GIL.
        env = {"TLM_REGISTRY_DATA_DIR": str(root / "data")}
        server, address = start_service("registry", root / "registry", env)
        try:
            seconds = asyncio.run(_rounds(address, src, root, args.repeats))
        finally:
            stop_service(server)
        rates = {name: [size_mb / s for s in runs] for name, runs in seconds.items()}
        print(f"artifact: {size_mb:.0f} MB; MB/s, median [min-max] of {args.repeats} rounds")
        for name, runs in rates.items():
            ratios = [a / b for a, b in zip(runs, rates["read/write copy"], strict=True)]
            print(
                f"{name:16s}: {statistics.median(runs):8.1f} [{min(runs):.1f}-{max(runs):.1f}]"
                f"   ratio vs read/write copy {statistics.median(ratios):.2f} "
                f"[{min(ratios):.2f}-{max(ratios):.2f}]"
            )
        print("target: upload and download >= 0.5 of the read/write copy")

        data = root / "rows.jsonl"
        _rows(data, args.rows)
        start = time.perf_counter()
        facts = validate_file(
            data,
            registry_pb2.DATASET_FORMAT_JSONL,
            registry_pb2.DATASET_KIND_PREFERENCE,
            root / "out.jsonl",
            max_row_bytes=1 << 20,
            max_errors=20,
        )
        validate_s = time.perf_counter() - start
        print(
            f"dataset validation: {facts.row_count / validate_s:,.0f} rows/s "
            f"({facts.row_count} preference rows, {data.stat().st_size / 2**20:.1f} MB)"
        )


if __name__ == "__main__":
    main()
