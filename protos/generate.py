"""Regenerate duo's Python stubs from protos/duo.proto (run from anywhere): python protos/generate.py"""

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate(out_dir: pathlib.Path = ROOT) -> None:
    """Write protos/duo_pb2.py, .pyi and _pb2_grpc.py under out_dir (imports read `from protos import ...`)."""
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / "protos" / "duo.proto")]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
