"""Bad input gets a clear error with the right gRPC status, and the services keep serving others."""

import threading

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
import pytest

from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common import codec, rpc
from duo.common.errors import InvalidArgument
from duo.common.rpc import ServerOptions
from duo.common.sessions import SessionRegistry
from duo.common.params import StoppingParams
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.inprocess import running_pair, verify_server
from tests.polling import eventually
from tests.tiny_models import VOCAB_SIZE, save_pair, word_tokenizer


def verify_stream(address, requests):
    with grpc.insecure_channel(address) as channel:
        return list(duo_pb2_grpc.VerifierStub(channel).Verify(iter(requests), timeout=30))


def opening(prompt=(1, 5, 9)):
    return pb.VerifyRequest(open=pb.VerifyOpen(session_id="", prompt_token_ids=list(prompt)))


def proposal(round_number, tokens, parents):
    return pb.VerifyRequest(proposal=pb.Proposal(
        round=round_number, tree=pb.TokenTree(token_ids=tokens, parent_indices=parents)))


def expect_status(code, fragment, call):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details()


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    pair = save_pair(tmp_path_factory.mktemp("bad-input"), "llama")
    with verify_server(pair.target_dir, max_tree_nodes=8) as (address, sessions):
        yield address, sessions


@pytest.mark.parametrize("requests, code, fragment", [
    ([opening(())], grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    ([opening((1, VOCAB_SIZE + 5))], grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ([opening((1,) * 300)], grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ([proposal(1, [5], [-1])], grpc.StatusCode.FAILED_PRECONDITION, "must start with VerifyOpen"),
    ([opening(), proposal(1, [5, 6], [-1, 4])], grpc.StatusCode.INVALID_ARGUMENT, "parent 4"),
    ([opening(), proposal(1, [5, 6], [1, 0])], grpc.StatusCode.INVALID_ARGUMENT, "parents precede children"),
    ([opening(), proposal(1, [5, 6], [-1])], grpc.StatusCode.INVALID_ARGUMENT, "parent indices"),
    ([opening(), proposal(1, list(range(3, 12)), list(range(-1, 8)))], grpc.StatusCode.INVALID_ARGUMENT, "at most 8"),
    ([opening(), proposal(1, [5, 999], [-1, 0])], grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ([opening(), proposal(2, [5], [-1])], grpc.StatusCode.INVALID_ARGUMENT, "expected round 1"),
    ([opening(), opening()], grpc.StatusCode.FAILED_PRECONDITION, "expected a Proposal"),
])
def test_verifier_refuses_bad_input_and_keeps_serving(verifier, requests, code, fragment):
    address, sessions = verifier
    expect_status(code, fragment, lambda: verify_stream(address, requests))
    # The same server still verifies a good session, and the failed one was released.
    responses = verify_stream(address, [opening(), proposal(1, [5, 6], [-1, 0])])
    assert responses[0].WhichOneof("message") == "prefilled"
    assert responses[1].WhichOneof("message") == "verdict"
    assert eventually(lambda: len(sessions) == 0)


def test_a_tree_with_a_cycle_cannot_be_expressed(verifier):
    address, _ = verifier
    # node 0 under node 1 and node 1 under node 0: refused because a parent must come first
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, "parents precede children",
                  lambda: verify_stream(address, [opening(), proposal(1, [5, 6], [1, 0])]))


def test_verifier_refuses_sessions_beyond_its_limit(tmp_path):
    pair = save_pair(tmp_path, "llama")
    with verify_server(pair.target_dir, max_sessions=1) as (address, sessions):
        with grpc.insecure_channel(address) as channel:
            stub = duo_pb2_grpc.VerifierStub(channel)
            release = threading.Event()

            def hold_open():
                yield opening()
                release.wait(10)

            held = stub.Verify(hold_open(), timeout=30)
            assert next(held).WhichOneof("message") == "prefilled"
            expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "already runs 1 sessions",
                          lambda: list(stub.Verify(iter([opening()]), timeout=30)))
            release.set()
            list(held)
        assert eventually(lambda: len(sessions) == 0)


def test_cancelled_client_frees_both_services_sessions(tmp_path):
    pair = save_pair(tmp_path, "llama")
    with running_pair(pair.target_dir, pair.draft_dir) as services:
        with grpc.insecure_channel(services.draft_addr) as channel:
            call = duo_pb2_grpc.DrafterStub(channel).Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[1, 5, 9]),
                stopping=pb.StoppingParams(max_new_tokens=200, ignore_eos=True)), timeout=60)
            first = next(call)
            assert first.WhichOneof("event") == "started"
            assert eventually(lambda: len(services.verify_sessions) == 1)
            call.cancel()
        assert eventually(lambda: len(services.draft_sessions) == 0 and len(services.verify_sessions) == 0)


@pytest.mark.parametrize("request_fields, fragment", [
    ({}, "prompt is missing"),
    ({"text": ""}, "prompt is empty"),
    ({"token_ids": pb.TokenIds(ids=[])}, "prompt is empty"),
    ({"token_ids": pb.TokenIds(ids=[1, 10_000])}, "outside the vocabulary"),
    ({"token_ids": pb.TokenIds(ids=[1] * 400)}, "context"),
    ({"text": "w1 w2", "stopping": pb.StoppingParams(max_new_tokens=0)}, "max_new_tokens"),
    ({"text": "w1 w2", "decoding": pb.DecodingParams(temperature=-1)}, "temperature"),
    ({"text": "w1 w2", "decoding": pb.DecodingParams(temperature=1, top_p=1.5)}, "top_p"),
    ({"text": "w1 w2", "budget": pb.DraftBudget(max_draft_tokens=10_000)}, "draft budget"),
    ({"text": "w1 w2", "apply_chat_template": True}, "tokenizer has none"),
    ({"messages": pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="w1")])}, "no chat template"),
    ({"messages": pb.ChatMessages()}, "no messages"),
    ({"messages": pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="w1")])}, "role 'robot'"),
    ({"text": "w1 w2", "decoding": pb.DecodingParams(temperature=1e-45)}, "greedy in all but name"),
    ({"text": "w1 w2", "decoding": pb.DecodingParams(temperature=1, top_p=float("nan"))}, "top_p"),
    ({"text": "w1 w2", "decoding": pb.DecodingParams(temperature=1, top_p=-0.5)}, "top_p"),
    ({"text": "w1 w2", "request_id": "forged\nlog line"}, "request ids"),
    ({"text": "w1 w2", "request_id": "x" * 129}, "request ids"),
])
def test_drafter_refuses_bad_requests_and_keeps_serving(tiny_services, request_fields, fragment):
    request = pb.GenerateRequest(stopping=pb.StoppingParams(max_new_tokens=4))
    for name, value in request_fields.items():
        if hasattr(value, "CopyFrom"):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    with grpc.insecure_channel(tiny_services.draft_addr) as channel:
        stub = duo_pb2_grpc.DrafterStub(channel)
        expect_status(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda: list(stub.Generate(request, timeout=30)))
        good = list(stub.Generate(pb.GenerateRequest(text="w1 w2", stopping=pb.StoppingParams(max_new_tokens=4)),
                                  timeout=30))
    assert good[-1].finished.stats.new_tokens >= 1


def distribution(probs):
    return pb.DraftDistribution(probs_f32=np.asarray(probs, dtype="<f4").tobytes())


def sampled_opening():
    return pb.VerifyRequest(open=pb.VerifyOpen(session_id="", prompt_token_ids=[1, 5, 9],
                                               decoding=pb.DecodingParams(temperature=1.0)))


@pytest.mark.parametrize("scale, fragment", [(5.0, "sums to 5"), (0.0, "sums to 0")])
def test_draft_distributions_that_do_not_sum_to_one_are_refused(verifier, scale, fragment):
    """Exact sampling needs the draft's real distribution: one that sums to 5 or to 0 is not one."""
    address, _ = verifier
    probs = np.full(VOCAB_SIZE, scale / VOCAB_SIZE)
    tree = pb.TokenTree(token_ids=[5], parent_indices=[-1], draft_distributions=[distribution(probs)])
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, fragment, lambda: verify_stream(
        address, [sampled_opening(), pb.VerifyRequest(proposal=pb.Proposal(round=1, tree=tree))]))
    good = pb.TokenTree(token_ids=[5], parent_indices=[-1],
                        draft_distributions=[distribution(np.full(VOCAB_SIZE, 1 / VOCAB_SIZE))])
    responses = verify_stream(address, [sampled_opening(), pb.VerifyRequest(proposal=pb.Proposal(round=1, tree=good))])
    assert responses[1].WhichOneof("message") == "verdict"


def test_a_proposal_over_the_node_limit_is_refused_before_its_distributions_are_read(verifier, monkeypatch):
    address, _ = verifier
    decoded = []
    monkeypatch.setattr(codec.np, "frombuffer", lambda *args, **kwargs: decoded.append(1) or np.zeros(VOCAB_SIZE))
    uniform = distribution(np.full(VOCAB_SIZE, 1 / VOCAB_SIZE))
    tree = pb.TokenTree(token_ids=list(range(3, 103)), parent_indices=list(range(-1, 99)),
                        draft_distributions=[uniform] * 100)
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, "at most 8", lambda: verify_stream(
        address, [sampled_opening(), pb.VerifyRequest(proposal=pb.Proposal(round=1, tree=tree))]))
    assert decoded == []


def test_an_error_about_a_huge_stop_string_fits_its_status(tiny_services):
    request = pb.GenerateRequest(text="w1 w2", stopping=pb.StoppingParams(max_new_tokens=4,
                                                                          stop_strings=["x" * 1_000_000]))
    with grpc.insecure_channel(tiny_services.draft_addr, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        expect_status(grpc.StatusCode.INVALID_ARGUMENT, "got one of 1000000",
                      lambda: list(duo_pb2_grpc.DrafterStub(channel).Generate(request, timeout=30)))


def test_long_error_details_are_cut_to_fit_the_trailers():
    code, details = rpc._status_for(InvalidArgument("y" * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(details) < rpc.MAX_DETAILS_CHARS + 50 and details.endswith("(100000 characters)")


def test_two_callers_may_send_the_same_request_id(tiny_services):
    """The id is the caller's, for logs; the services count sessions under keys of their own."""
    request = pb.GenerateRequest(text="w1 w2", request_id="same-id", stopping=pb.StoppingParams(max_new_tokens=30))
    with grpc.insecure_channel(tiny_services.draft_addr) as channel:
        stub = duo_pb2_grpc.DrafterStub(channel)
        first = stub.Generate(request, timeout=30)
        assert next(first).WhichOneof("event") == "started"
        second = list(stub.Generate(request, timeout=30))
        assert second[-1].finished.stats.new_tokens >= 1
        assert list(first)[-1].finished.stats.new_tokens >= 1


def test_incompatible_tokenizers_are_refused_before_drafting(tmp_path):
    pair = save_pair(tmp_path, "llama", draft_tokenizer=word_tokenizer(extra_word="other"))
    with running_pair(pair.target_dir, pair.draft_dir) as services:
        with grpc.insecure_channel(services.draft_addr) as channel:
            request = GenerationRequest(prompt_ids=(1, 5), stopping=StoppingParams(max_new_tokens=4))
            expect_status(grpc.StatusCode.FAILED_PRECONDITION, "tokenizers differ",
                          lambda: Orchestrator(channel, timeout_s=30).generate(request, FixedBudget(4)))
        assert len(services.verify_sessions) == 0 and services.verify_sessions.total_opened == 0


def test_service_limits_on_prompt_and_new_tokens_are_enforced(tmp_path):
    from duo.draft_service.servicer import DrafterConfig

    pair = save_pair(tmp_path, "llama")
    config = DrafterConfig(max_new_tokens_limit=16, max_prompt_tokens=4)
    with running_pair(pair.target_dir, pair.draft_dir, config=config) as services:
        with grpc.insecure_channel(services.draft_addr) as channel:
            stub = duo_pb2_grpc.DrafterStub(channel)
            too_long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5, 6, 7, 8]),
                                          stopping=pb.StoppingParams(max_new_tokens=4))
            expect_status(grpc.StatusCode.INVALID_ARGUMENT, "accepts at most 4",
                          lambda: list(stub.Generate(too_long, timeout=30)))
            too_many = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5]), stopping=pb.StoppingParams(max_new_tokens=17))
            expect_status(grpc.StatusCode.INVALID_ARGUMENT, "exceeds this service's limit 16",
                          lambda: list(stub.Generate(too_many, timeout=30)))
            # Text that cannot fit in 4 tokens, whatever it tokenizes to, is refused before it is tokenized.
            huge = pb.GenerateRequest(text="w1 " * 100_000, apply_chat_template=False,
                                      stopping=pb.StoppingParams(max_new_tokens=4))
            expect_status(grpc.StatusCode.INVALID_ARGUMENT, "characters: more than 4 tokens",
                          lambda: list(stub.Generate(huge, timeout=30)))
            ok = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5, 6, 7]), stopping=pb.StoppingParams(max_new_tokens=16))
            assert list(stub.Generate(ok, timeout=30))[-1].finished.stats.new_tokens >= 1


def test_an_idle_session_is_reaped_only_while_the_service_waits_for_its_peer():
    cancelled = []
    registry = SessionRegistry(4, idle_timeout_s=10)
    with registry.hold(lambda: cancelled.append("waiting")) as waiting, \
            registry.hold(lambda: cancelled.append("working")):
        waiting.waiting_since = 100.0  # what Lease.messages sets while it waits for the next message
        assert registry.reap_idle(now=105.0) == []
        assert registry.reap_idle(now=111.0) == [waiting]
        assert registry.reap_idle(now=200.0) == []  # once
    assert cancelled == ["waiting"] and registry.total_reaped == 1


def test_a_session_whose_peer_stops_taking_its_responses_is_reaped():
    cancelled = []
    registry = SessionRegistry(4, idle_timeout_s=10)
    with registry.hold(lambda: cancelled.append("stalled")) as lease:
        responses = lease.delivered(iter(["first", "second"]))
        assert next(responses) == "first"  # handed to the transport, which has not taken it yet
        assert lease.waiting_since is not None
        assert registry.reap_idle(now=lease.waiting_since + 11) == [lease]
        assert next(responses) == "second"  # taken: the next one is watched afresh
        waiting_since = lease.waiting_since
        assert registry.reap_idle(now=waiting_since + 5) == []
        assert next(responses, None) is None and lease.waiting_since is None  # all taken: nothing watched
    assert cancelled == ["stalled"]


def test_silent_streams_count_as_sessions_are_reaped_and_never_starve_the_service(tmp_path):
    """Streams that open and send nothing take session slots (beyond the limit: RESOURCE_EXHAUSTED), so the
    server keeps threads for health and model-info calls; after the idle timeout they are closed, and so is
    a session that prefilled and then went quiet."""
    pair = save_pair(tmp_path, "llama")
    options = ServerOptions(max_sessions=4, idle_timeout_s=0.5)
    with verify_server(pair.target_dir, options=options) as (address, sessions), \
            grpc.insecure_channel(address) as channel:
        stub = duo_pb2_grpc.VerifierStub(channel)
        quiet = threading.Event()

        def silent():
            quiet.wait(30)
            yield from ()

        def prefill_then_silent():
            yield opening()
            quiet.wait(30)

        held = [stub.Verify(silent(), timeout=30) for _ in range(3)]
        prefilled = stub.Verify(prefill_then_silent(), timeout=30)
        assert next(prefilled).WhichOneof("message") == "prefilled"
        assert eventually(lambda: len(sessions) == 4)
        expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "already runs 4 sessions",
                      lambda: verify_stream(address, [opening()]))
        assert stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5).vocab_size == VOCAB_SIZE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert eventually(lambda: len(sessions) == 0, timeout_s=10)  # all four reaped
        assert sessions.total_reaped == 4
        for call in [*held, prefilled]:
            with pytest.raises(grpc.RpcError):
                list(call)
        quiet.set()
        responses = verify_stream(address, [opening(), proposal(1, [5, 6], [-1, 0])])
        assert responses[1].WhichOneof("message") == "verdict"
