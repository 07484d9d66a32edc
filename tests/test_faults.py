"""Faults: when the verify service goes away mid-generation, the draft service carries the generation on
with a new verifier session once a verifier is back (the caller sees a delay, the same tokens); when none
comes back in time, the caller gets UNAVAILABLE with a message that says so, the draft service frees the
session and keeps serving once a verifier is back."""

import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from duo.draft_service.readiness import follow_verifier
from duo.draft_service.servicer import DrafterConfig
from duo.common.resume import ResumePolicy
from duo.common import codec
from duo.common.errors import Unavailable
from duo.common.params import DecodingParams
from duo.common.rpc import ServiceServer, translate_errors

from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.inprocess import draft_server, verify_server
from tests.polling import eventually
from tests.tiny_models import reference_greedy, reference_seeded, save_pair


SEEDED = DecodingParams(temperature=0.9, top_p=0.95, seed=42)


def long_request(max_new_tokens=1500, decoding: DecodingParams = DecodingParams()):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5, 9]), budget=pb.DraftBudget(max_draft_tokens=2),
                              stopping=pb.StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
                              decoding=codec.decoding_to_pb(decoding))


@pytest.mark.parametrize("decoding", [DecodingParams(), SEEDED], ids=["greedy", "seeded-sampling"])
def test_a_generation_carries_on_exactly_when_its_verifier_restarts(tmp_path, decoding):
    pair = save_pair(tmp_path, "llama", context=2048)
    verify_cm = verify_server(pair.target_dir)
    verify_addr, _ = verify_cm.__enter__()
    with draft_server(pair.draft_dir, verify_addr) as (draft_addr, _), grpc.insecure_channel(draft_addr) as channel:
        events = iter(duo_pb2_grpc.DrafterStub(channel).Generate(long_request(800, decoding), timeout=120))
        tokens = []
        for message in events:
            tokens.extend(message.committed.token_ids)
            if len(tokens) >= 20:
                break
        verify_cm.__exit__(None, None, None)  # the verifier goes away mid-session...
        with verify_server(pair.target_dir, port=int(verify_addr.rsplit(":", 1)[1])):  # ...and a new one starts
            for message in events:
                tokens.extend(message.committed.token_ids)
                finished = codec.event_from_pb(message)
    assert finished.stats.verifier_resumes >= 1
    assert finished.stats.new_tokens == len(tokens) == 800
    if decoding.is_greedy:
        assert tokens == reference_greedy(pair.target, [1, 5, 9], 800, eos_token_id=None)
    else:  # the seeded draws of the positions after the resume are those the lost verifier would have made
        assert tokens == reference_seeded(pair.target, [1, 5, 9], 800, decoding)


def test_verifier_dying_mid_generation_is_reported_and_the_drafter_recovers(tmp_path):
    pair = save_pair(tmp_path, "llama", context=2048)
    verify_cm = verify_server(pair.target_dir)
    verify_addr, _ = verify_cm.__enter__()
    port = verify_addr.rsplit(":", 1)[1]
    brief = DrafterConfig(resume=ResumePolicy(attempts=2, within_s=3, first_pause_s=0.1))  # none back in time
    with draft_server(pair.draft_dir, verify_addr, brief) as (draft_addr, draft_sessions):
        with grpc.insecure_channel(draft_addr) as channel:
            stub = duo_pb2_grpc.DrafterStub(channel)
            events = iter(stub.Generate(long_request(), timeout=60))
            next(events), next(events)
            verify_cm.__exit__(None, None, None)  # the verifier goes away mid-session
            try:
                for _ in events:
                    pass
                raise AssertionError("the generation should have failed")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert "verify service" in exc.details()
            assert eventually(lambda: len(draft_sessions) == 0)
            # A verifier comes back on the same address: the drafter serves again.
            with verify_server(pair.target_dir, port=int(port)):
                done = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5]),
                                                             stopping=pb.StoppingParams(max_new_tokens=5)),
                                          timeout=60))
            assert done[-1].finished.stats.new_tokens == 5


def test_the_draft_service_is_not_ready_while_its_verifier_is_unreachable():
    """Its health follows the verifier channel: NOT_SERVING once the verifier has gone (so a load balancer
    sends callers elsewhere), SERVING again when a verifier is back on the address."""
    drafter = ServiceServer(["duo.v1.Drafter"])
    drafter_port = drafter.bind("127.0.0.1:0")
    drafter.start()
    verifier = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    verifier_port = verifier.add_insecure_port("127.0.0.1:0")
    verifier.start()
    with grpc.insecure_channel(f"127.0.0.1:{verifier_port}") as to_verifier, \
            grpc.insecure_channel(f"127.0.0.1:{drafter_port}") as to_drafter:
        health = health_pb2_grpc.HealthStub(to_drafter)

        def status():
            return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status

        drafter.mark_serving()
        stop_following = follow_verifier(to_verifier, drafter.set_serving)
        assert eventually(lambda: status() == health_pb2.HealthCheckResponse.SERVING, timeout_s=15)
        verifier.stop(0)
        assert eventually(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=15)
        back = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        back.add_insecure_port(f"127.0.0.1:{verifier_port}")
        back.start()
        assert eventually(lambda: status() == health_pb2.HealthCheckResponse.SERVING, timeout_s=15)
        stop_following()
        drafter.stop(0)
        back.stop(0)



class LoadingVerifier(duo_pb2_grpc.VerifierServicer):
    """A verify service whose model is still loading: every call is UNAVAILABLE."""

    @translate_errors
    def GetModelInfo(self, request, context):
        raise Unavailable("the target model is still loading; retry shortly")


def test_a_generation_asked_for_while_the_verifier_restarts_waits_for_it(tmp_path):
    pair = save_pair(tmp_path, "llama")
    verify_cm = verify_server(pair.target_dir)
    verify_addr, _ = verify_cm.__enter__()
    port = int(verify_addr.rsplit(":", 1)[1])
    with draft_server(pair.draft_dir, verify_addr) as (draft_addr, _), grpc.insecure_channel(draft_addr) as channel:
        verify_cm.__exit__(None, None, None)
        loading = ServiceServer(["duo.v1.Verifier"])  # the restarted verifier, still loading its model...
        duo_pb2_grpc.add_VerifierServicer_to_server(LoadingVerifier(), loading.server)
        loading.bind(f"127.0.0.1:{port}")
        loading.start()
        call = duo_pb2_grpc.DrafterStub(channel).Generate(pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=[1, 5, 9]), stopping=pb.StoppingParams(max_new_tokens=12)), timeout=60)
        time.sleep(1.5)
        loading.stop(0)
        with verify_server(pair.target_dir, port=port):  # ...and serving a moment later
            events = list(call)
    assert events[-1].finished.stats.new_tokens == 12
