"""`make demo`: start the embedded services (`tlm up`), check them, run the main flow on a tiny
model (an SFT job, then a GRPO job whose reward must rise), and stop cleanly. Each step prints
what it did; any failure, or a reward curve that misses the bar, exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from services.cli.plots import Series, metric_series
from services.cli.trainer_cmds import read_job

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
    ready_args = ["--ready-file", str(ready)]
    log_file = (data_dir / "server.log").open("w")
    proc = subprocess.Popen(
        [*TLM, "up", "--port", "0", "--http-port", "0", "--data-dir", str(data_dir), *ready_args],
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


def addition_chat_rows(upto: int) -> str:
    """SFT rows (JSON lines) that teach the `<answer>` format: every a + b for a, b in 1..upto.

    >>> print(addition_chat_rows(1), end="")  # doctest: +NORMALIZE_WHITESPACE
    {"messages": [{"role": "user", "content": "What is 1 + 1?"},
                  {"role": "assistant", "content": "<answer>2</answer>"}]}
    """
    return "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"<answer>{a + b}</answer>"},
                ]
            }
        )
        + "\n"
        for a in range(1, upto + 1)
        for b in range(1, upto + 1)
    )


def _gateway_url(data_dir: Path) -> str:
    """The OpenAI-compatible endpoint's URL, from `tlm up`'s log (it starts before ready)."""
    for line in (data_dir / "server.log").read_text().splitlines():
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "gateway_started":
            return str(event["url"])
    raise SystemExit(f"tlm up started no gateway; see {data_dir / 'server.log'}")


def _deploy_and_ask(data_dir: Path, env: dict[str, str]) -> None:
    """Deploy the trained revision and ask it through the OpenAI-compatible endpoint with the
    official client, streamed; the same question unstreamed must give the same answer."""
    from openai import OpenAI  # a dev dependency, as the demo is

    _run("deployments", "create", "demo-chat", "--model", "tiny-sft", "--wait", env=env)
    client = OpenAI(base_url=f"{_gateway_url(data_dir)}/v1", api_key="demo", max_retries=0)
    ask = {"model": "demo-chat", "temperature": 0, "max_tokens": 16}
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    console.print("[bold]$ openai: client.chat.completions.create(model='demo-chat', ...)[/]")
    whole = client.chat.completions.create(messages=question, **ask)  # type: ignore[call-overload]
    chunks = client.chat.completions.create(messages=question, stream=True, **ask)  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    console.print(f"answer: {whole.choices[0].message.content!r} (streamed: {streamed!r})")
    if streamed != whole.choices[0].message.content:
        raise SystemExit("the streamed answer differs from the whole one")


# GRPO on the demo's arithmetic prompts with a rule reward the random tiny model rarely earns
# at first: answer with a number (a digit within 6 tokens, about 1 in 7 samples). Full tuning
# at a high learning rate learns it in about 20 steps (seconds each on CPU); the seeds are
# fixed, so the curve is the same every run.
DIGITS = {"scorers": [{"name": "digit", "regex": {"pattern": "[0-9]"}}]}
GRPO_SPEC = {
    "method": "METHOD_GRPO",
    "tuning": {"full": {}},
    "training": {"max_steps": 25, "per_device_batch_size": 8, "learning_rate": 0.01, "seed": 1},
    "grpo": {"num_generations": 8, "sampling": {"max_tokens": 6, "seed": 1}},
}
FIRST_BELOW, LAST_ABOVE, LAST_STEPS = 0.2, 0.8, 5  # step 1 below, mean of the last 5 above
PLOTS = Path(tempfile.gettempdir()) / "tlm-demo-plots"


def _grpo(data_dir: Path, address: str, env: dict[str, str]) -> bool:
    """The GRPO job through the CLI (a spec file, flags on top), its reward curve, the bar
    and the plots. Returns whether the curve passed."""
    console.rule("GRPO: learn to answer with a number")
    evaluator = data_dir / "digits.json"
    evaluator.write_text(json.dumps(DIGITS))
    _run("evaluators", "push", "digits", str(evaluator), env=env)
    spec = data_dir / "grpo.json"
    spec.write_text(json.dumps(GRPO_SPEC, indent=1))
    job = ["jobs", "create", "--spec", str(spec), "--base-model", "tiny", "--dataset", "arith"]
    job += ["--evaluator", "digits", "--beta", "0.04", "--log-every", "1"]
    started = time.monotonic()
    name = _run(*job, "--output-model", "models/tiny-grpo", "--watch", env=env).split()[0]
    console.print(f"GRPO took {time.monotonic() - started:.0f} s")
    try:
        _, events = read_job(address, name)
    except typer.Exit as exc:  # the error is printed already
        raise SystemExit(f"could not read the events of {name}") from exc
    rewards = _curve(metric_series(events))
    passed = _passed(rewards)
    chosen = [arg for metric in ("reward_mean", "kl", "loss") for arg in ("--metric", metric)]
    _run("jobs", "plot", name, "--out", str(PLOTS), *chosen, env=env)
    return passed


def _curve(series: Series) -> list[float]:
    """Print reward, KL and loss per step; return the rewards."""
    table = Table("step", "reward", "", "KL", "loss", title="GRPO reward curve")
    kl, loss = dict(series.get("kl", [])), dict(series.get("loss", []))
    rewards = series.get("reward_mean", [])
    for step, reward in rewards:
        bar = "█" * round(20 * max(0.0, min(reward, 1.0)))
        table.add_row(str(step), f"{reward:.3f}", bar, _fmt(kl.get(step)), _fmt(loss.get(step)))
    console.print(table)
    return [reward for _, reward in rewards]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _passed(rewards: list[float]) -> bool:
    if len(rewards) < LAST_STEPS:
        console.print(f"[red]only {len(rewards)} steps of reward were logged[/]")
        return False
    first, last = rewards[0], sum(rewards[-LAST_STEPS:]) / LAST_STEPS
    ok = first < FIRST_BELOW and last > LAST_ABOVE
    colour = "green" if ok else "red"
    console.print(
        f"[{colour}]mean reward {first:.3f} at step 1 (bar < {FIRST_BELOW}) -> {last:.3f} over "
        f"the last {LAST_STEPS} steps (bar > {LAST_ABOVE})[/]"
    )
    return ok


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tlm-demo-") as tmp:
        data_dir = Path(tmp)
        env = {**os.environ, "TLM_LOG_JSON": "true", "HF_HUB_OFFLINE": "1"}
        console.rule("TLM demo: embedded services on a tiny model")
        proc, address = _start(data_dir, env)
        env["TLM_ADDRESS"] = address
        console.print(f"tlm up is serving on {address} (data in {data_dir})")
        console_url = f"{_gateway_url(data_dir)}/console/"
        console.print(f"web console: {console_url} (the jobs' curves, live while the demo runs)")
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
            chat.write_text(addition_chat_rows(8))
            _run("datasets", "push", "chat", str(chat), "--kind", "sft", env=env)
            job = ["jobs", "create", "--method", "sft", "--base-model", "tiny", "--dataset", "chat"]
            job += ["--full", "--max-steps", "160", "--learning-rate", "0.003"]
            _run(*job, "--output-model", "models/tiny-sft", "--watch", env=env)
            _run("models", "show", "tiny-sft@latest", env=env)
            # Serve the trained revision and ask it the question in its chat format.
            ask = ["generate", "--model", "tiny-sft", "--load", "--chat", "--temperature", "0"]
            _run(*ask, "--prompt", "What is 2 + 2?", "--max-tokens", "16", env=env)
            _deploy_and_ask(data_dir, env)
            passed = _grpo(data_dir, address, env)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        if code != 0:
            raise SystemExit(f"tlm up exited with {code}; see its log above")
        console.print("[green]tlm up stopped cleanly[/]")
        console.print(
            f"The web console was at {console_url} while the demo ran; to browse your own data,"
            " `tlm up --http-port PORT` serves it at /console on that port."
        )
        if not passed:
            raise SystemExit(f"GRPO missed the bar: {FIRST_BELOW} -> {LAST_ABOVE} mean reward")
        console.rule("demo finished")


if __name__ == "__main__":
    main()
