"""Training jobs: the create-a-job flow (method -> data of the kinds it accepts -> evaluator
builder or a stored evaluator -> advanced parameters -> resources -> Create), the jobs list, and
a job's page with its state and live curves from WatchTrainingJob as server-sent events."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common import proto_json
from services.common.errors import FieldViolation, InvalidArgument, TlmError
from services.console import forms, views
from services.console.app import BASE, Console, form_of
from services.console.clients import Clients
from services.console.scorers import builder_scorers
from tlm.trainer.v1 import trainer_pb2 as pb

WATCH_S = 6 * 3600.0  # one event stream's deadline; the browser reconnects from where it was
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
CURVES = ("reward_mean", "kl", "loss")  # drawn first, in this order; other metrics follow


def state_name(state: int) -> str:
    return proto_json.short_name(pb.TrainingJob.State, state)


async def _choices(clients: Clients, m: forms.MethodDef) -> dict[str, Any]:
    """What the form offers: base revisions, datasets of the method's kind, evaluators."""
    models, datasets, evaluators = await asyncio.gather(
        clients.registry.list_resources("models"),
        clients.registry.list_resources("datasets"),
        clients.registry.list_resources("evaluators"),
    )
    bases = [
        f"{mo.name}/revisions/{ref}"
        for mo in models
        if mo.latest_revision_id
        for ref in ("latest", *sorted(mo.aliases))
    ]
    accepted = [d for d in datasets if d.kind == forms.dataset_kind(m) and d.latest_revision_id]
    return {
        "bases": bases,
        "datasets": [f"{d.name}/revisions/latest" for d in accepted],
        "hidden_datasets": len([d for d in datasets if d.latest_revision_id]) - len(accepted),
        "evaluators": [f"{e.name}/revisions/latest" for e in evaluators if e.latest_revision_id],
    }


def _all_fields(m: forms.MethodDef) -> list[str]:
    """Every input path that can carry an error, so a check clears the old ones."""
    paths = [*forms.NAMES, "method", "tuning", "resources", "tuning.lora.r"]
    paths += ["tuning.lora.alpha_value", "resources.auto.max_devices", "evaluator_name"]
    return paths + [f.path for f in (*forms.param_fields(m), *forms.explicit_fields())]


def routes(console: Console) -> list[Route]:
    async def new(request: Request) -> Response:
        values = dict(request.query_params)
        try:
            m = forms.method_def(values.get("method", "METHOD_GRPO"))
        except ValueError:
            m = forms.method_def("METHOD_GRPO")
        clients = console.clients(request)
        choices, scorers = await asyncio.gather(
            _choices(clients, m), clients.reward.list_scorer_types()
        )
        return console.render(
            request,
            "job_new.html",
            m=m,
            methods=forms.implemented(),
            params=forms.param_fields(m),
            explicit=forms.explicit_fields(),
            kind=forms.KIND_WORDS[m.dataset],
            scorers=builder_scorers(scorers),
            values=values,
            **choices,
        )

    async def validate_evaluator(request: Request) -> Response:
        spec_json = (await form_of(request)).get("spec_json", "")
        response = await console.clients(request).reward.validate_evaluator(spec_json)
        return console.render(request, "_evaluator_check.html", result=response)

    async def _spec(request: Request, form: Mapping[str, str]) -> pb.TrainingJobSpec:
        """The form's spec; a built evaluator is validated and stored as a revision first."""
        spec = forms.spec_dict(form)
        if form.get("evaluator_source") == "built" and forms.method_def(form["method"]).evaluator:
            spec["evaluator"] = await _store_evaluator(console.clients(request), form)
        return forms.spec_message(spec)

    async def check(request: Request) -> Response:
        """validate_only: the trainer's verdict and the spec with its defaults filled in."""
        form = await form_of(request)
        m = forms.method_def(form.get("method", ""))
        built = form.get("evaluator_source") == "built" and bool(m.evaluator)
        try:
            spec = forms.spec_message(forms.spec_dict(form))
            job = await console.clients(request).trainer.create_job(
                pb.CreateTrainingJobRequest(spec=spec, validate_only=True)
            )
        except TlmError as exc:
            # A built evaluator is stored only on Create; the builder checks it meanwhile.
            kept = [v for v in exc.violations if not (built and v.field == "spec.evaluator")]
            if exc.violations and not kept:
                return _checked(console, request, m, None, [], "")
            return _checked(console, request, m, None, kept, exc.message)
        filled = json.dumps(json_format.MessageToDict(job.spec), indent=2)
        return _checked(console, request, m, filled, [], "")

    async def create(request: Request) -> Response:
        form = await form_of(request)
        m = forms.method_def(form.get("method", ""))
        try:
            spec = await _spec(request, form)
            create_ = pb.CreateTrainingJobRequest(
                spec=spec, display_name=form.get("display_name", "")
            )
            job = await console.clients(request).trainer.create_job(create_)
        except TlmError as exc:
            return _checked(console, request, m, None, exc.violations, exc.message)
        job_id = job.name.removeprefix("jobs/")
        return HTMLResponse("", headers={"HX-Redirect": f"{BASE}/jobs/{job_id}"})

    async def estimate(request: Request) -> Response:
        form = await form_of(request)
        try:
            # The trainer checks that the evaluator exists, so a built one is stored first
            # (once per content: Create then finds the same revision).
            spec = await _spec(request, form)
            result = await console.clients(request).trainer.estimate(spec)
        except TlmError as exc:
            return console.render(request, "_estimate.html", error=exc, result=None)
        return console.render(
            request,
            "_estimate.html",
            error=None,
            result=result,
            strategy=proto_json.short_name(pb.ParallelStrategy, result.plan.strategy),
            device=proto_json.short_name(pb.DeviceType, result.plan.device_type),
        )

    async def jobs(request: Request) -> Response:
        found = await console.clients(request).trainer.list_jobs(
            pb.ListTrainingJobsRequest(page_size=200)
        )
        return console.render(
            request,
            "jobs.html",
            jobs=found,
            state=lambda j: state_name(j.state),
            method=lambda j: proto_json.short_name(pb.Method, j.spec.method),
        )

    async def job(request: Request) -> Response:
        found = await console.clients(request).trainer.get_job(_job_name(request))
        return _job_page(console, request, found, "job.html")

    async def summary(request: Request) -> Response:
        found = await console.clients(request).trainer.get_job(_job_name(request))
        return _job_page(console, request, found, "_job_summary.html")

    async def cancel(request: Request) -> Response:
        found = await console.clients(request).trainer.cancel_job(_job_name(request))
        return _job_page(console, request, found, "_job_summary.html")

    async def events(request: Request) -> Response:
        """The job's events as server-sent events; `Last-Event-ID` resumes after a reconnect."""
        name = _job_name(request)
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() else 0
        stream = console.clients(request).trainer.watch(name, start, timeout_s=WATCH_S)
        return StreamingResponse(_sse(stream), media_type="text/event-stream")

    return [
        Route("/jobs", jobs),
        Route("/jobs/new", new),
        Route("/jobs/check", check, methods=["POST"]),
        Route("/jobs/estimate", estimate, methods=["POST"]),
        Route("/jobs/create", create, methods=["POST"]),
        Route("/evaluators/validate", validate_evaluator, methods=["POST"]),
        Route("/jobs/{job}", job),
        Route("/jobs/{job}/summary", summary),
        Route("/jobs/{job}/cancel", cancel, methods=["POST"]),
        Route("/jobs/{job}/events", events),
    ]


def _job_name(request: Request) -> str:
    return f"jobs/{request.path_params['job']}"


def _job_page(console: Console, request: Request, job: pb.TrainingJob, template: str) -> Response:
    return console.render(
        request,
        template,
        job=job,
        state=state_name(job.state),
        terminal=state_name(job.state) in TERMINAL,
        method=proto_json.short_name(pb.Method, job.spec.method),
        spec_json=json.dumps(json_format.MessageToDict(job.spec), indent=2),
        curves=CURVES,
    )


def _checked(
    console: Console,
    request: Request,
    m: forms.MethodDef,
    filled: str | None,
    violations: list[FieldViolation],
    message: str,
) -> Response:
    errors = views.field_errors(violations)
    paths = _all_fields(m)
    return console.render(
        request,
        "_job_check.html",
        filled=filled,
        errors=errors,
        unplaced={k: v for k, v in errors.items() if k not in paths},
        paths=paths,
        message=message,
        input_id=views.input_id,
    )


async def _store_evaluator(clients: Clients, form: Mapping[str, str]) -> str:
    """Validate the builder's JSON and store it as a revision of `evaluator_name`."""
    name = form.get("evaluator_name", "").strip()
    if not name:
        bad = FieldViolation("evaluator_name", "name the evaluator to store it")
        raise InvalidArgument("evaluator_name: name the evaluator", violations=[bad])
    checked = await clients.reward.validate_evaluator(form.get("evaluator_json", ""))
    if not checked.valid:
        found = [FieldViolation("evaluator_json", f"{e.path}: {e.message}") for e in checked.errors]
        raise InvalidArgument("the evaluator is not valid", violations=found)
    parent = name if name.startswith("evaluators/") else f"evaluators/{name}"
    # The same spec under the same name is one revision, however often it is stored.
    request_id = hashlib.sha256(f"{parent}\n{checked.normalized_json}".encode()).hexdigest()[:32]
    revision = await clients.registry.create_evaluator_revision(
        parent, checked.normalized_json, request_id
    )
    return revision.name


async def _sse(stream: AsyncIterator[pb.JobEvent]) -> AsyncIterator[str]:
    try:
        async for event in stream:
            kind, data = _event_data(event)
            if kind:
                yield f"id: {event.sequence}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
    except TlmError as exc:
        yield f"event: failure\ndata: {json.dumps({'message': exc.message})}\n\n"
        return
    yield "event: end\ndata: {}\n\n"


def _event_data(event: pb.JobEvent) -> tuple[str, dict[str, Any]]:
    """One job event as (SSE event name, JSON data); ("", {}) for kinds the page ignores."""
    which = event.WhichOneof("event")
    if which == "metrics":
        m = event.metrics
        return "metrics", {"step": m.step, "epoch": m.epoch, "values": dict(m.values)}
    if which == "state_change":
        s = event.state_change
        return "state", {"state": state_name(s.state), "message": s.message}
    if which == "result":
        r = event.result
        return "result", {
            "output_model_revision": r.output_model_revision,
            "metrics": dict(r.metrics),
        }
    if which == "checkpoint":
        c = event.checkpoint
        return "checkpoint", {"step": c.step, "policy_revision": c.policy_revision}
    if which == "log":
        return "log", {"level": event.log.level, "message": event.log.message}
    return "", {}
