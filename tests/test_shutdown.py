"""SIGTERM drains: health goes NOT_SERVING, new calls are refused, a generation in flight completes, and
the service exits 0. The services run as real processes (`python -m … serve`)."""

import signal
import subprocess
import sys
import time

import grpc
import pytest

from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.tiny_models import save_pair

LONG = 2000  # tokens: long enough to still be running when SIGTERM arrives


def start(module, args, workdir, name):
    port_file = workdir / f"{name}.port"
    log = open(workdir / f"{name}.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", "0",
                                "--port-file", str(port_file), "--grace-s", "60", *args],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        assert process.poll() is None, (workdir / f"{name}.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process, f"127.0.0.1:{port_file.read_text()}"


def wait_serving(address):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{address} never became SERVING")


@pytest.fixture
def services(tmp_path):
    pair = save_pair(tmp_path, "llama", context=LONG + 64)
    verify, verify_addr = start("duo.verify_service.cli", ["--model", str(pair.target_dir), "--device", "cpu",
                                                       "--threads", "1"], tmp_path, "verify")
    draft, draft_addr = start("duo.draft_service.cli", ["--model", str(pair.draft_dir), "--verify-addr", verify_addr,
                                                    "--threads", "1"], tmp_path, "draft")
    try:
        wait_serving(verify_addr)
        wait_serving(draft_addr)
        yield {"verify": verify, "draft": draft}, draft_addr, tmp_path
    finally:
        for process in (draft, verify):
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("stopped", ["draft", "verify"])
def test_generation_in_flight_at_sigterm_completes_and_service_exits_zero(services, stopped):
    processes, draft_addr, workdir = services
    with grpc.insecure_channel(draft_addr) as channel:
        stub = duo_pb2_grpc.DrafterStub(channel)
        call = stub.Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[1, 5, 9]), budget=pb.DraftBudget(max_draft_tokens=2),
            stopping=pb.StoppingParams(max_new_tokens=LONG, ignore_eos=True)), timeout=120)
        tokens = 0
        events = iter(call)
        while tokens < 20:
            event = next(events)
            tokens += len(event.committed.token_ids)
        processes[stopped].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        if stopped == "draft":  # a draining service takes no new calls
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5])), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finished = None
        for event in events:
            tokens += len(event.committed.token_ids)
            if event.WhichOneof("event") == "finished":
                finished = event.finished
    assert finished is not None and finished.reason == pb.FINISH_REASON_LENGTH
    assert tokens == LONG
    assert processes[stopped].wait(timeout=60) == 0
    # The session really was in flight: the service logged the drain before it logged the session's end.
    log = (workdir / f"{stopped}.log").read_text()
    session_end = "tokens (length)" if stopped == "draft" else "ended after"
    assert "draining" in log and session_end in log
    assert log.index("draining") < log.index(session_end), log[-2000:]
