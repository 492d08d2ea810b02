"""`make demo`: start the embedded services (`tlm up`), check them, run the main flow on a tiny
model, and stop cleanly. Each step prints what it did; any failure exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

console = Console()
TLM = [sys.executable, "-m", "services.cli.main"]


def _run(*args: str, env: dict[str, str]) -> str:
    console.print(f"[bold]$ tlm {' '.join(args)}[/]")
    out = subprocess.run([*TLM, *args], capture_output=True, text=True, env=env, timeout=600)
    sys.stdout.write(out.stdout)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"`tlm {' '.join(args)}` failed with exit code {out.returncode}")
    return out.stdout


def _start(data_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    ready = data_dir / "address"
    log_file = (data_dir / "server.log").open("w")
    proc = subprocess.Popen(
        [*TLM, "up", "--port", "0", "--data-dir", str(data_dir), "--ready-file", str(ready)],
        stderr=log_file,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tlm up did not start; see {data_dir / 'server.log'}")
        time.sleep(0.2)
    return proc, ready.read_text()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tlm-demo-") as tmp:
        data_dir = Path(tmp)
        env = {**os.environ, "TLM_LOG_JSON": "true", "HF_HUB_OFFLINE": "1"}
        console.rule("TLM demo: embedded services on a tiny model")
        proc, address = _start(data_dir, env)
        env["TLM_ADDRESS"] = address
        console.print(f"tlm up is serving on {address} (data in {data_dir})")
        try:
            health = json.loads(_run("health", "--json", env=env))
            assert all(v["status"] == "SERVING" for v in health.values()), health
            console.print("[green]all four services SERVING[/]")
            model_dir = data_dir / "tiny-model"
            _run("dev", "tiny-model", str(model_dir), env=env)
            _run("models", "push", "tiny", str(model_dir), env=env)
            prompts = data_dir / "arith.jsonl"
            prompts.write_text(
                "".join(
                    json.dumps({"prompt": f"What is {a} + {b}?", "reference": str(a + b)}) + "\n"
                    for a in range(1, 5)
                    for b in range(1, 5)
                )
            )
            _run("datasets", "push", "arith", str(prompts), "--kind", "prompt", env=env)
            _run("datasets", "head", "arith", "-n", "3", env=env)
            spec = data_dir / "math.json"
            spec.write_text(_run("evaluators", "init", "--template", "math", env=env))
            _run("evaluators", "push", "math", str(spec), env=env)
            samples = data_dir / "samples.jsonl"
            samples.write_text(
                "".join(
                    json.dumps(
                        {
                            "sample_id": sid,
                            "prompt": "What is 2 + 2?",
                            "completion": text,
                            "metadata": {"reference": "4"},
                        }
                    )
                    + "\n"
                    for sid, text in [
                        ("right", "<think>2 plus 2</think><answer>4</answer>"),
                        ("wrong", "<think>hmm</think><answer>5</answer>"),
                        ("no-format", "4"),
                    ]
                )
            )
            _run(
                "score",
                "--evaluator",
                "evaluators/math/revisions/latest",
                "--input",
                str(samples),
                env=env,
            )
            _run(
                "generate",
                "--model",
                "tiny",
                "--prompt",
                "What is 2 + 2?",
                "-n",
                "2",
                "--max-tokens",
                "16",
                "--seed",
                "0",
                env=env,
            )
            # The main job: SFT of the tiny model on chat rows, followed to the end.
            chat = data_dir / "chat.jsonl"
            chat.write_text(
                "".join(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": f"What is {a} + {b}?"},
                                {"role": "assistant", "content": f"<answer>{a + b}</answer>"},
                            ]
                        }
                    )
                    + "\n"
                    for a in range(1, 9)
                    for b in range(1, 9)
                )
            )
            _run("datasets", "push", "chat", str(chat), "--kind", "sft", env=env)
            job = ["jobs", "create", "--method", "sft", "--base-model", "tiny", "--dataset", "chat"]
            job += ["--full", "--max-steps", "160", "--learning-rate", "0.003"]
            _run(*job, "--output-model", "models/tiny-sft", "--watch", env=env)
            _run("models", "show", "tiny-sft@latest", env=env)
            # Serve the trained revision and ask it the question in its chat format.
            ask = ["generate", "--model", "tiny-sft", "--load", "--chat", "--temperature", "0"]
            _run(*ask, "--prompt", "What is 2 + 2?", "--max-tokens", "16", env=env)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        if code != 0:
            raise SystemExit(f"tlm up exited with {code}; see its log above")
        console.print("[green]tlm up stopped cleanly[/]")
        console.rule("demo finished")


if __name__ == "__main__":
    main()
