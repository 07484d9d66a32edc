"""The committed stubs are exactly what protos/generate.py makes from protos/duo.proto."""

from duo.protos.generate import PROTOS, generate


def test_committed_stubs_match_the_proto(tmp_path):
    generate(tmp_path)
    for name in ("duo_pb2.py", "duo_pb2.pyi", "duo_pb2_grpc.py"):
        fresh = (tmp_path / name).read_text()
        committed = (PROTOS / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run python protos/generate.py"


def test_every_rpc_and_field_is_documented():
    lines = (PROTOS / "duo.proto").read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("rpc "):
            assert lines[index - 1].strip().startswith("//"), f"undocumented RPC: {stripped}"
