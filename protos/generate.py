"""Regenerate duo's Python stubs from protos/duo.proto (run from anywhere): python protos/generate.py

The package installs as ``duo.protos``, so protoc sees the proto at duo/protos/duo.proto (a staging copy) and
the stubs import each other as ``from duo.protos import ...``."""

import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

PROTOS = pathlib.Path(__file__).resolve().parent


def generate(out_dir: pathlib.Path = PROTOS) -> None:
    """Write duo_pb2.py, .pyi and _pb2_grpc.py into out_dir."""
    with tempfile.TemporaryDirectory() as staging:
        root = pathlib.Path(staging)
        (root / "in" / "duo" / "protos").mkdir(parents=True)
        (root / "out").mkdir()
        shutil.copy(PROTOS / "duo.proto", root / "in" / "duo" / "protos" / "duo.proto")
        args = ["protoc", f"-I{root / 'in'}", f"--python_out={root / 'out'}", f"--pyi_out={root / 'out'}",
                f"--grpc_python_out={root / 'out'}", "duo/protos/duo.proto"]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for generated in (root / "out" / "duo" / "protos").iterdir():
            shutil.copy(generated, out_dir / generated.name)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS)
