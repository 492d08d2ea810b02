"""Print pyproject.toml's pinned dependencies (plus extras) one a line, for the image build.

    python requirements.py pyproject.toml [EXTRA[,EXTRA...]]

The Dockerfile installs these before copying the source, so the heavy dependency layer is
rebuilt only when pyproject.toml changes; `pip install --no-deps .` then adds TLM itself.
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: str = "") -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    result = list(project["dependencies"])
    for extra in filter(None, (e.strip() for e in extras.split(","))):
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject has {sorted(optional)}")
        result += optional[extra]
    return result


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")))
