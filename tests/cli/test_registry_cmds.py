"""`tlm models|datasets|evaluators` against a running embedded server."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from services.devtools.server_thread import ServerThread
from tests.tlm_process import TLM


def tlm(server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TLM, *args, "--address", server.address], capture_output=True, text=True, timeout=120
    )


def test_models_push_list_show(embedded: ServerThread, tiny_model_dir: Path) -> None:
    out = tlm(embedded, "models", "push", "cli-tiny", str(tiny_model_dir), "--request-id", "k")
    assert out.returncode == 0, out.stderr
    assert "models/cli-tiny/revisions/r1" in out.stdout
    listed = tlm(embedded, "models", "list", "--prefix", "cli-")
    assert "models/cli-tiny" in listed.stdout
    shown = json.loads(tlm(embedded, "models", "show", "cli-tiny@latest").stdout)
    assert shown["metadata"]["architecture"] == "Qwen2ForCausalLM"
    missing = tlm(embedded, "models", "show", "nope")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr


def test_datasets_push_head_and_refusal(embedded: ServerThread, tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    out = tlm(embedded, "datasets", "push", "cli-pref", str(good), "--kind", "preference")
    assert out.returncode == 0 and "1 rows" in out.stdout, out.stderr
    head = tlm(embedded, "datasets", "head", "cli-pref")
    assert json.loads(head.stdout.splitlines()[0])["chosen"] == "a"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n')
    refused = tlm(embedded, "datasets", "push", "cli-pref", str(bad), "--kind", "preference")
    assert refused.returncode == 2
    assert "INVALID_ARGUMENT" in refused.stderr and "rows[0].chosen" in refused.stderr
