"""The console's pages over HTTP (no browser): sign-in and team isolation, page times on the
embedded services, field errors from validate_only placed next to their inputs, and the
vendored scripts equal to the npm packages they come from."""

from __future__ import annotations

import re
import statistics
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from services.console import forms
from tests.console.conftest import KEY, Stack

PAGES = ["/models", "/datasets", "/jobs/new", "/jobs/new?method=METHOD_DPO", "/jobs", "/reviews"]
PAGES += ["/deployments"]
BUDGET_MS = 300.0
STATIC = Path(__file__).parents[2] / "services" / "console" / "static"
NODE_MODULES = Path(__file__).parents[1] / "node" / "node_modules"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def get(
    url: str, key: str | None = KEY, data: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body)
    if key is not None:
        request.add_header("Cookie", f"tlm_console_key={key}")
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def test_without_a_valid_key_pages_send_you_to_sign_in(stack: Stack) -> None:
    for key in (None, "no-such-key"):
        status, headers, _ = get(f"{stack.console}/datasets", key)
        assert status == 303 and headers["location"].startswith("/console/login"), (key, status)
    status, _, body = get(f"{stack.console}/login", None)
    assert status == 200 and 'for="api_key"' in body


def test_each_team_sees_its_own_catalogue(stack: Stack) -> None:
    _, _, mine = get(f"{stack.console}/models")
    _, _, theirs = get(f"{stack.console}/models", "key-team-b")
    assert "models/tiny" in mine and "models/tiny" not in theirs


def test_upload_then_preview_rows(stack: Stack) -> None:
    rows = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "c"}\n'
    query = urllib.parse.urlencode({"name": "prefs", "kind": "preference", "filename": "x.jsonl"})
    request = urllib.request.Request(f"{stack.console}/datasets/upload?{query}", data=rows)
    request.add_header("Cookie", f"tlm_console_key={KEY}")
    with urllib.request.urlopen(request, timeout=60) as r:
        refused = r.read().decode()
    assert 'data-row="1"' in refused and "rejected" in refused and 'data-row="0"' not in refused
    request = urllib.request.Request(request.full_url, data=rows.splitlines(True)[0])
    request.add_header("Cookie", f"tlm_console_key={KEY}")
    with urllib.request.urlopen(request, timeout=60) as r:
        assert "datasets/prefs/revisions/r1" in r.read().decode()
    _, _, body = get(f"{stack.console}/datasets/prefs")
    assert re.search(r"<strong>1</strong> rows", body) and '<pre class="cell">a</pre>' in body


def test_pages_answer_within_the_budget(stack: Stack) -> None:
    for page in PAGES:
        times = []
        for _ in range(3):
            status, headers, _ = get(stack.console + page)
            assert status == 200, page
            times.append(float(re.fullmatch(r"app;dur=([\d.]+)", headers["server-timing"])[1]))  # type: ignore[index]
        assert statistics.median(times) < BUDGET_MS, (page, times)


def test_check_places_the_trainers_field_errors_next_to_their_inputs(stack: Stack) -> None:
    form = {
        "method": "METHOD_DPO",
        "base_model": "models/tiny/revisions/latest",
        "train_dataset": "datasets/none/revisions/latest",
        "tuning": "lora",
        "dpo.beta": "-1",
        "training.max_steps": "two",
        "resources": "auto",
    }
    _, _, body = get(f"{stack.console}/jobs/check", data=form)
    assert re.search(r'id="err-f-training-max_steps"[^>]*>must be a whole number<', body), body
    form["training.max_steps"] = "2"
    _, _, body = get(f"{stack.console}/jobs/check", data=form)
    beta = re.search(r'id="err-f-dpo-beta"[^>]*>([^<]+)<', body)
    assert beta is not None, body


def test_the_form_offers_only_what_each_method_reads() -> None:
    for m in forms.implemented():
        paths = {f.path for f in forms.param_fields(m)}
        assert paths and paths <= m.reads, m.name
        assert all(p.split(".")[0] in ("training", m.params_field) for p in paths)
    grpo = {f.path: f for f in forms.param_fields(forms.method_def("GRPO"))}
    assert grpo["grpo.beta"].default == "0.04" and "dpo.beta" not in grpo


def test_a_value_of_the_wrong_type_names_its_field() -> None:
    with pytest.raises(Exception) as info:
        forms.spec_dict({"method": "METHOD_SFT", "training.learning_rate": "fast"})
    assert [v.field for v in info.value.violations] == ["spec.training.learning_rate"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("vendored", "package"),
    [
        ("htmx.min.js", "htmx.org/dist/htmx.min.js"),
        ("uPlot.iife.min.js", "uplot/dist/uPlot.iife.min.js"),
        ("uPlot.min.css", "uplot/dist/uPlot.min.css"),
    ],
)
def test_vendored_scripts_are_the_pinned_packages(vendored: str, package: str) -> None:
    """services/console/static/ holds copies of tests/node's pinned npm packages (committed, so
    the console installs with pip alone); `make console-assets` refreshes them."""
    source = NODE_MODULES / package
    if not source.exists():
        pytest.fail("run `make setup` (npm ci in tests/node) first")
    assert (STATIC / vendored).read_bytes() == source.read_bytes()
