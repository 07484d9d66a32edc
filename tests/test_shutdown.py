"""SIGTERM drains: health goes NOT_SERVING, new calls are refused, a generation in flight completes, and
the service exits 0. The services run as real processes (`python -m … serve`)."""

import signal
import time

import grpc
import pytest

from duo.client.child_service import ChildService, serving_at, wait_all_serving
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.tiny_models import save_pair

LONG = 2000  # tokens: long enough to still be running when SIGTERM arrives
START_TIMEOUT_S = 120


# start and wait_serving: the package's ChildService in the shape tests/test_http_api.py imports them.
def start(module, args, workdir, name):
    """``python -m MODULE serve ARGS`` on a loopback port of its choosing, draining for up to a minute on SIGTERM:
    its process and address."""
    child = ChildService.start(name, [module, "serve", *args], workdir, grace_s=60)
    return child.process, f"{ChildService.HOST}:{child.wait_port(time.monotonic() + START_TIMEOUT_S)}"


def wait_serving(address):
    deadline = time.monotonic() + START_TIMEOUT_S
    while not serving_at(address):
        assert time.monotonic() < deadline, f"{address} never became SERVING"
        time.sleep(0.1)


@pytest.fixture
def services(tmp_path):
    pair = save_pair(tmp_path, "llama", context=LONG + 64)
    verify = ChildService.start("verify", ["duo.verify_service.cli", "serve", "--model", str(pair.target_dir),
                                           "--device", "cpu", "--threads", "1"], tmp_path, grace_s=60)
    draft = ChildService.start("draft", ["duo.draft_service.cli", "serve", "--model", str(pair.draft_dir),
                                         "--verify-port-file", str(verify.port_file), "--threads", "1"],
                               tmp_path, grace_s=60)
    try:
        wait_all_serving((verify, draft), time.monotonic() + START_TIMEOUT_S)
        yield {"verify": verify.process, "draft": draft.process}, draft.address(), tmp_path
    finally:
        for child in (draft, verify):
            child.kill()


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
