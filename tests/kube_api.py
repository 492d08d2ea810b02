"""A stand-in for the Kubernetes API server on loopback: the few endpoints the trainer's
Kubernetes launcher calls, with the real API's paths, JSON shapes and status codes.

No kube-apiserver can be installed here (none is packaged on PyPI, npm or Debian), so the
launcher's tests talk to this instead; it is the external system, not ours. It stores what is
created (after checking every object against the Kubernetes schemas with kubernetes-validate,
as the real server's validation would: 422 otherwise), answers reads and deletes from that
store (404 for what is missing, 409 for what exists; an object with finalizers stays, marked
deleted, as the real server keeps it until a controller removes them), and records every
request so the tests can read the calls the launcher made. There is no controller: a test plays
the Job controller and the kubelet by setting a Job's status and adding pods (`set_job_status`,
`add_pod`), or a previous trainer process by adding objects (`add`).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import kubernetes_validate
import yaml

VERSION = "1.37"
# (group, version, resource) of the paths served, as the API lays them out.
PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[a-z.]+)/(?P<version>v[0-9a-z]+))"
    r"/namespaces/(?P<ns>[a-z0-9-]+)/(?P<resource>[a-z]+)(?:/(?P<name>[a-z0-9.-]+))?$"
)
TIME = "%Y-%m-%dT%H:%M:%SZ"  # the API's timestamps (RFC 3339, to the second)
KINDS = {"services": ("v1", "Service"), "jobs": ("batch/v1", "Job"), "pods": ("v1", "Pod")}


@dataclass(frozen=True)
class Call:
    method: str
    group: str  # "" for the core API
    resource: str
    name: str  # "" for a collection
    query: dict[str, list[str]]
    body: Any

    @property
    def verb(self) -> str:
        """The RBAC verb of this request."""
        if self.method == "GET":
            return "get" if self.name else "list"
        return {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}[
            self.method
        ]


@dataclass
class FakeApi:
    """The server's state; `url` once started."""

    url: str = ""
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    forbid_create: bool = False  # answer creates 403, as a missing RBAC grant would
    forbid_jobs: bool = False  # answer Job creates 403, as a ResourceQuota on Jobs would
    # Job creates wait until it is set (a slow API server): a test acts while one is in flight.
    hold_job_creates: threading.Event | None = None
    reads_fail: bool = False  # answer reads 503, as an API server restarting would
    lock: threading.Lock = field(default_factory=threading.Lock)
    _uids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # What a test plays: the Job controller and the kubelet -------------------------------

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return self.objects.get((resource, namespace, name))

    def set_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        with self.lock:
            self.objects[("jobs", namespace, name)]["status"] = status

    def add(self, resource: str, namespace: str, body: dict[str, Any]) -> None:
        """Store an object as a create would, without recording a call."""
        with self.lock:
            code, answer = self._create(resource, namespace, body)
        assert code == 201, answer

    def add_pod(self, namespace: str, pod: dict[str, Any]) -> None:
        kubernetes_validate.validate(pod, VERSION, strict=True)
        with self.lock:
            self.objects[("pods", namespace, pod["metadata"]["name"])] = pod

    def created(self, resource: str) -> list[Any]:
        return [c.body for c in self.calls if c.method == "POST" and c.resource == resource]

    # The API -------------------------------------------------------------------------------

    def handle(self, method: str, url: str, body: Any) -> tuple[int, dict[str, Any]]:
        parsed = urlparse(url)
        match = PATH.match(parsed.path)
        if match is None or match["resource"] not in KINDS:
            return 404, status(404, "NotFound", f"the server could not find {parsed.path}")
        group = "" if match["core"] else match["group"]
        resource, ns, name = match["resource"], match["ns"], match["name"] or ""
        if method == "POST" and resource == "jobs" and self.hold_job_creates is not None:
            self.hold_job_creates.wait(30)
        with self.lock:
            self.calls.append(Call(method, group, resource, name, parse_qs(parsed.query), body))
            key = (resource, ns, name)
            if method == "POST" and not name:
                return self._create(resource, ns, body)
            if method == "GET" and self.reads_fail:
                return 503, status(503, "ServiceUnavailable", "the server is shutting down")
            if method == "GET" and name:
                found = self.objects.get(key)
                return (200, found) if found else missing(resource, name)
            if method == "GET":
                return 200, self._list(resource, ns, parse_qs(parsed.query))
            if method == "DELETE" and name:
                return self._delete(key)
        return 405, status(405, "MethodNotAllowed", f"{method} {parsed.path}")

    def _create(self, resource: str, ns: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.forbid_create or (self.forbid_jobs and resource == "jobs"):
            message = f'{resource} is forbidden: cannot create resource "{resource}"'
            return 403, status(403, "Forbidden", message)
        api_version, kind = KINDS[resource]
        if body.get("apiVersion") != api_version or body.get("kind") != kind:
            return 400, status(400, "BadRequest", f"expected {api_version} {kind}")
        try:
            kubernetes_validate.validate(body, VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return 422, status(422, "Invalid", f"{kind} is invalid: {exc.message}")
        name = body["metadata"]["name"]
        if (resource, ns, name) in self.objects:
            return 409, status(409, "AlreadyExists", f'{resource} "{name}" already exists')
        stored = json.loads(json.dumps(body))
        stored["metadata"] |= {
            "namespace": ns,
            "uid": f"uid-{next(self._uids)}",
            "resourceVersion": str(next(self._uids)),
            "creationTimestamp": datetime.now(UTC).strftime(TIME),
        }
        stored.setdefault("status", {})
        self.objects[(resource, ns, name)] = stored
        return 201, stored

    def _list(self, resource: str, ns: str, query: dict[str, list[str]]) -> dict[str, Any]:
        wanted = dict(
            pair.split("=", 1) for pair in query.get("labelSelector", [""])[0].split(",") if pair
        )
        items = [
            obj
            for (kind, namespace, _), obj in sorted(self.objects.items())
            if kind == resource
            and namespace == ns
            and all(obj["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]
        api_version, kind = KINDS[resource]
        return {"apiVersion": api_version, "kind": f"{kind}List", "metadata": {}, "items": items}

    def _delete(self, key: tuple[str, str, str]) -> tuple[int, dict[str, Any]]:
        found = self.objects.get(key)
        if found is None:
            return missing(key[0], key[2])
        if found["metadata"].get("finalizers"):  # deleted once they are removed: not here
            found["metadata"]["deletionTimestamp"] = datetime.now(UTC).strftime(TIME)
            return 200, found
        del self.objects[key]
        if key[0] == "jobs":  # the garbage collector: the Job's pods go with it (foreground)
            for pod_key, pod in list(self.objects.items()):
                if pod_key[0] == "pods" and pod["metadata"]["labels"].get("tlm.dev/job") == key[2]:
                    del self.objects[pod_key]
        found["metadata"]["deletionTimestamp"] = datetime.now(UTC).strftime(TIME)
        return 200, found


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A metav1.Status, the body of every error answer."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def missing(resource: str, name: str) -> tuple[int, dict[str, Any]]:
    return 404, status(404, "NotFound", f'{resource} "{name}" not found')


@contextmanager
def serving() -> Iterator[FakeApi]:
    api = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            code, payload = api.handle(self.command, self.path, json.loads(raw) if raw else None)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _answer

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


def kubeconfig_file(path: Path, url: str, namespace: str) -> Path:
    """A kubeconfig file for `url`, with a bearer token and a default namespace."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": url}}],
                "users": [{"name": "trainer", "user": {"token": "t"}}],
                "contexts": [
                    {
                        "name": "test",
                        "context": {"cluster": "test", "user": "trainer", "namespace": namespace},
                    }
                ],
                "current-context": "test",
            }
        )
    )
    return path
