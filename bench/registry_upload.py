"""Registry throughput: a ~200 MB artifact uploaded and downloaded through the service vs a
plain file copy on the same disk, and dataset validation speed in rows/s.

    .venv/bin/python bench/registry_upload.py [--mb 200] [--rows 200000]

Prints each figure and the ratio service / plain copy (target >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.clients.registry import RegistryClient
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


async def _service(address: str, src: Path, out: Path) -> tuple[float, float]:
    client = RegistryClient(address)
    start = time.perf_counter()
    rev = await client.upload_model_revision("models/bench", src)
    upload = time.perf_counter() - start
    start = time.perf_counter()
    await client.download_model_revision(rev.name, out)
    download = time.perf_counter() - start
    await client.close()
    return upload, download


def _start_registry(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready = root / "address"
    env = {
        **os.environ,
        "TLM_REGISTRY_DATA_DIR": str(root / "data"),
        "TLM_LOG_LEVEL": "warning",
        "TLM_REGISTRY_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve",
            "registry",
            "--port",
            "0",
            "--insecure-dev",
            "--ready-file",
            str(ready),
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit("the registry did not start")
        time.sleep(0.1)
    return proc, ready.read_text()


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
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlm-bench-", dir=os.environ.get("TMPDIR")) as tmp:
        root = Path(tmp)
        src = _make_artifact(root / "src", args.mb)
        size_mb = sum(p.stat().st_size for p in src.rglob("*")) / 2**20
        kernel_s = _kernel_copy(src, root / "kcopy")
        user_s = _userspace_copy(src, root / "ucopy")
        # The service runs in its own process, as deployed: client and server share no GIL.
        server, address = _start_registry(root)
        try:
            up_s, down_s = asyncio.run(_service(address, src, root / "down"))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
        kernel, user = size_mb / kernel_s, size_mb / user_s
        up, down = size_mb / up_s, size_mb / down_s
        print(f"artifact: {size_mb:.0f} MB (target ratio >= 0.5)")
        print(f"plain copy, in-kernel (shutil.copytree): {kernel:8.1f} MB/s")
        print(f"plain copy, read/write loop            : {user:8.1f} MB/s")
        for what, rate in (("upload  ", up), ("download", down)):
            print(
                f"service {what} (gRPC, sha256 checked)  : {rate:8.1f} MB/s   "
                f"ratio vs in-kernel {rate / kernel:.2f}, vs read/write {rate / user:.2f}"
            )

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
