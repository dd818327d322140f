"""Generates the Python modules of protos/ into shared/gen (run by `make proto`, `make up`, `make test`).

grpcio-tools (protoc and the gRPC plugin) is a runtime dependency: a checkout has no generated code
until this runs. The .pyi type stubs come from mypy-protobuf, a dev tool: written (quietly) when it is
installed, as for `make test` and `make lint`, and skipped otherwise; nothing at run time reads them.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "shared" / "gen"


def main() -> int:
    """Regenerate shared/gen from protos/runs/v1/*.proto."""
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    mypy_plugin = pathlib.Path(sys.executable).parent / "protoc-gen-mypy"
    stubs = [f"--plugin=protoc-gen-mypy={mypy_plugin}", f"--mypy_out=quiet:{OUT}"] if mypy_plugin.exists() else []
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={OUT}",
            f"--grpc_python_out={OUT}",
            *stubs,
            *files,
        ]
    )
    if rc != 0:
        return int(rc)
    # The generated modules import each other as `runs.v1`; they live under shared.gen.
    for path in OUT.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^from runs\.v1 import", "from shared.gen.runs.v1 import", text, flags=re.M)
        fixed = re.sub(r"^import runs\.v1\.", "import shared.gen.runs.v1.", fixed, flags=re.M)
        path.write_text(fixed)
    for folder in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
