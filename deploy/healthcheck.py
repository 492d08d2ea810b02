"""Container health check: gRPC health of this container's own TLM service.

    python healthcheck.py [SERVICE] [PORT]

SERVICE defaults to the one PID 1 serves (`tlm serve <service>`, read from /proc/1/cmdline);
PORT to `--port` on that command line, else TLM_<SERVICE>_PORT, else 50051 (8080 for the HTTP
gateway, whose `GET /health` is checked instead). Exit 0 when the service reports SERVING, 1
otherwise. (`tlm health` checks all four services, so it does not
fit a one-service container; grpc_health_probe is not in the image.)
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

from services.cli.health import SERVICE_NAMES, check_health
from services.common.settings import DEFAULT_PORT
from services.gateway.settings import DEFAULT_HTTP_PORT

GATEWAY = "gateway"  # HTTP, not gRPC


def pid1_args() -> list[str]:
    try:
        with open("/proc/1/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def target(argv: list[str], cmdline: list[str], env: dict[str, str]) -> tuple[str, int]:
    """(service, port) from the arguments, PID 1's command line and the environment."""
    service = argv[0] if argv else None
    if service is None and "serve" in cmdline:
        rest = cmdline[cmdline.index("serve") + 1 :]
        service = next((a for a in rest if not a.startswith("-")), None)
    if service not in SERVICE_NAMES and service != GATEWAY:
        raise SystemExit(f"healthcheck: unknown service {service!r}")
    if len(argv) > 1:
        return service, int(argv[1])
    for i, arg in enumerate(cmdline):
        if arg.startswith("--port="):
            return service, int(arg.split("=", 1)[1])
        if arg == "--port" and i + 1 < len(cmdline):
            return service, int(cmdline[i + 1])
    default = DEFAULT_HTTP_PORT if service == GATEWAY else DEFAULT_PORT
    return service, int(env.get(f"TLM_{service.upper()}_PORT") or default)


def http_status(port: int) -> str:
    """The gateway's own /health answer, or why there is none."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as response:
            return str(json.load(response).get("status"))
    except (OSError, ValueError) as exc:
        return f"UNAVAILABLE ({exc})"


def main() -> int:
    service, port = target(sys.argv[1:], pid1_args(), dict(os.environ))
    if service == GATEWAY:
        status = http_status(port)
    else:
        status = check_health(service, f"127.0.0.1:{port}", timeout=3)["status"]
    print(f"{service}: {status}", file=sys.stdout if status == "SERVING" else sys.stderr)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
