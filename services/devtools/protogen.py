"""Generate the Python code for `protos/` into `gen/python/` (`make protos`).

The output is committed; `tests/test_protos.py` regenerates into a temporary folder and fails
when the committed code drifts from the protos.

`protos/google/` holds copies of the googleapis protos ours import (`google/rpc/...`, from the
pinned googleapis-common-protos), so any language compiles or loads `protos/` alone. They are
imported, never generated here: Python gets them from the googleapis-common-protos package.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
DEFAULT_OUT = REPO / "gen" / "python"


OURS = "tlm"  # the folder of our own protos; everything else under protos/ is vendored
VENDORED = "google"  # copies of googleapis protos, kept byte-identical to the pinned package's


def _include_dirs(proto_root: Path = PROTO_ROOT) -> list[Path]:
    # protos/ alone plus the well-known types (google/protobuf) that every protoc ships.
    return [proto_root, Path(str(resources.files("grpc_tools") / "_proto"))]


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Our own protos (`protos/tlm/...`), the ones generated and checked against our conventions."""
    return sorted((proto_root / OURS).rglob("*.proto"))


def vendored_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The vendored googleapis protos (`protos/google/...`), paths relative to `proto_root`."""
    return sorted(p.relative_to(proto_root) for p in (proto_root / VENDORED).rglob("*.proto"))


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    if protoc.main(["protoc", *args]) != 0:
        raise RuntimeError("protoc failed; see its messages above")


def descriptor_set(out_file: Path, proto_root: Path = PROTO_ROOT) -> Path:
    """Compile the protos, with comments, into a FileDescriptorSet (for convention checks)."""
    _protoc(
        [
            *(f"-I{d}" for d in _include_dirs(proto_root)),
            f"--descriptor_set_out={out_file}",
            "--include_source_info",
            *(str(p.relative_to(proto_root)) for p in proto_files(proto_root)),
        ]
    )
    return out_file


def generate(out: Path = DEFAULT_OUT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Regenerate all stubs into `out` (wiped first). Returns the generated files."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plugin_dir = Path(sys.executable).parent
    args = [
        *(f"-I{d}" for d in _include_dirs(proto_root)),
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        *(str(p.relative_to(proto_root)) for p in proto_files(proto_root)),
    ]
    _protoc(args)
    # Regular packages (not namespace ones) so setuptools and mypy find them; py.typed for PEP 561.
    for pkg in [out / "tlm", *(p for p in (out / "tlm").rglob("*") if p.is_dir())]:
        (pkg / "__init__.py").touch()
    (out / "tlm" / "py.typed").touch()
    return sorted(p for p in out.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    files = generate(parser.parse_args().out)
    sys.stdout.write(f"generated {len(files)} files\n")


if __name__ == "__main__":
    main()
