"""The first token: nothing in front of the prefill that need not be there, and a breakdown of where its time
went (draft service, verifier queue, prefill, links), as the session stats and the client report it."""

import grpc
import pytest

from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.draft_service.servicer import DrafterConfig
from duo.draft_service.speculation import SessionPlan, SpeculativeSession
from duo.draft_service.target_info import TargetInfoCache
from duo.draft_service.verifier_link import PrefillReply, VerdictReply
from duo.common.errors import Cancelled
from duo.common.models import ModelInfo
from duo.common.params import DecodingParams, StoppingParams
from duo.common.stopping import StopChecker
from duo.common.tree import TokenTree
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.inprocess import draft_server, verify_server
from tests.tiny_models import reference_greedy, save_pair, word_tokenizer
from duo.verify_service.servicer import VerifierServicer

READY, IDLE, CONNECTING = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE,
                           grpc.ChannelConnectivity.CONNECTING)


class FakeChannel:
    def __init__(self, state=IDLE):
        self.state = state

    def subscribe(self, callback, try_to_connect=False):
        self.callback = callback
        callback(self.state)  # as gRPC does: the current state first


class CountingFetch:
    def __init__(self, channel: FakeChannel | None = None, states_during_fetch=()):
        self.calls = 0
        self.channel, self.states_during_fetch = channel, states_during_fetch

    def __call__(self) -> ModelInfo:
        self.calls += 1
        for state in self.states_during_fetch:
            self.channel.callback(state)
        return ModelInfo(model_name=f"target-{self.calls}", vocab_size=100, eos_token_ids=(2,), max_context_tokens=256,
                         tokenizer_fingerprint="t", device="cpu", dtype="float32")


def test_the_target_info_is_asked_once_per_connection():
    channel = FakeChannel()
    fetch = CountingFetch()
    cache = TargetInfoCache(channel, fetch)
    channel.callback(READY)
    first, asked = cache.get()
    assert asked and fetch.calls == 1
    assert cache.get() == (first, False) and fetch.calls == 1
    channel.callback(IDLE)  # the connection is gone: the next verifier may run another model
    second, asked = cache.get()
    assert asked and fetch.calls == 2 and second.model_name == "target-2"


def test_the_first_connection_setup_does_not_throw_the_answer_away():
    channel = FakeChannel()
    fetch = CountingFetch(channel, states_during_fetch=(CONNECTING, READY))  # the fetch opens the connection
    cache = TargetInfoCache(channel, fetch)
    cache.get()
    cache.get()
    assert fetch.calls == 1


def test_an_answer_fetched_across_a_lost_connection_is_not_kept():
    channel = FakeChannel(READY)
    fetch = CountingFetch(channel, states_during_fetch=(IDLE,))
    cache = TargetInfoCache(channel, fetch)
    cache.get()
    channel.callback(READY)
    cache.get()
    assert fetch.calls == 2


def test_forget_makes_the_next_session_ask_again():
    channel = FakeChannel()
    fetch = CountingFetch()
    cache = TargetInfoCache(channel, fetch)
    channel.callback(READY)
    cache.get()
    cache.forget()
    assert cache.get()[1] and fetch.calls == 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("first-token"), "llama")


def generate(channel, prompt=(1, 5, 9, 20), tokens=8):
    request = GenerationRequest(prompt_ids=prompt, stopping=StoppingParams(max_new_tokens=tokens, ignore_eos=True))
    return Orchestrator(channel, timeout_s=60).generate(request, FixedBudget(3))


@pytest.fixture
def model_info_calls(monkeypatch) -> list:
    """The GetModelInfo calls that verify services in this process answer."""
    calls = []
    original = VerifierServicer.GetModelInfo
    monkeypatch.setattr(VerifierServicer, "GetModelInfo",
                        lambda self, request, context: calls.append(request) or original(self, request, context))
    return calls


def test_sessions_after_the_first_start_without_a_model_info_round_trip(pair, model_info_calls):
    with verify_server(pair.target_dir) as (verify_addr, _), \
            draft_server(pair.draft_dir, verify_addr) as (draft_addr, _), \
            grpc.insecure_channel(draft_addr) as channel:
        results = [generate(channel) for _ in range(3)]
    assert len(model_info_calls) == 1
    assert results[0].server_stats.first_token.model_info_s > 0
    assert [result.server_stats.first_token.model_info_s for result in results[1:]] == [0.0, 0.0]


def test_a_restarted_verifier_is_asked_for_its_model_once_more(pair, model_info_calls):
    """A new connection may reach another verifier: its model is asked for again, once."""
    first = verify_server(pair.target_dir)
    verify_addr, _ = first.__enter__()
    port = int(verify_addr.rsplit(":", 1)[1])
    with draft_server(pair.draft_dir, verify_addr) as (draft_addr, _), grpc.insecure_channel(draft_addr) as channel:
        try:
            generate(channel)
        finally:
            first.__exit__(None, None, None)
        assert len(model_info_calls) == 1
        with verify_server(pair.target_dir, port=port):  # back on the same address
            results = [generate(channel) for _ in range(2)]
    assert len(model_info_calls) == 2
    assert [result.server_stats.first_token.model_info_s > 0 for result in results] == [True, False]


def test_the_first_token_breakdown_adds_up(pair):
    with verify_server(pair.target_dir) as (verify_addr, _), \
            draft_server(pair.draft_dir, verify_addr) as (draft_addr, _), \
            grpc.insecure_channel(draft_addr) as channel:
        result = generate(channel, prompt=tuple(range(3, 60)))
    server = result.server_stats
    times = server.first_token
    assert times.prefill_s > 0 and times.tokenize_s > 0 and times.verifier_link_s > 0
    assert times.verifier_queue_s >= 0
    parts = times.tokenize_s + times.model_info_s + times.verifier_queue_s + times.prefill_s + times.verifier_link_s
    assert parts <= server.ttft_s <= result.ttft_s
    breakdown = result.summary()["first_token"]
    assert set(breakdown) == {"tokenize_s", "model_info_s", "verifier_queue_s", "prefill_s", "verifier_link_s",
                              "draft_service_s", "client_link_s"}
    assert sum(breakdown.values()) == pytest.approx(result.ttft_s, abs=1e-3)


def test_a_verifier_refuses_a_drafter_with_another_tokenizer(pair):
    with verify_server(pair.target_dir) as (verify_addr, _), grpc.insecure_channel(verify_addr) as channel:
        stub = duo_pb2_grpc.VerifierStub(channel)
        mine = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10).tokenizer_fingerprint

        def opening(fingerprint):
            return iter([pb.VerifyRequest(open=pb.VerifyOpen(session_id="s", prompt_token_ids=[1, 5],
                                                             draft_tokenizer_fingerprint=fingerprint))])

        assert next(iter(stub.Verify(opening(mine), timeout=30))).HasField("prefilled")
        assert next(iter(stub.Verify(opening(""), timeout=30))).HasField("prefilled")  # older drafters say nothing
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stub.Verify(opening("another tokenizer"), timeout=30)))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tokenizer" in refused.value.details()


def test_a_replaced_verifier_with_another_model_is_refused_not_trusted_from_the_cache(pair, tmp_path):
    other = save_pair(tmp_path, "llama", draft_tokenizer=word_tokenizer(extra_word="hello"))
    first = verify_server(pair.target_dir)
    verify_addr, _ = first.__enter__()
    port = int(verify_addr.rsplit(":", 1)[1])
    with draft_server(pair.draft_dir, verify_addr) as (draft_addr, _), grpc.insecure_channel(draft_addr) as channel:
        try:
            assert len(generate(channel).token_ids) == 8  # the drafter now knows this verifier's model
        finally:
            first.__exit__(None, None, None)
        with verify_server(other.draft_dir, port=port):  # a model with another tokenizer, same address
            with pytest.raises(grpc.RpcError) as refused:
                generate(channel)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert "tokenizer" in refused.value.details()


class ScriptedLink:
    """A verifier that answers at once: first token 7, then no accepted node and next token 8 each round."""

    def __init__(self, log):
        self.log = log

    def open(self, session_id, prompt, params):
        self.log.append("verifier prefill starts")

    def wait_prefill(self):
        self.log.append("first token arrives")
        return PrefillReply(first_token=7, compute_s=0.01)

    def send(self, round_number, tree):
        self.round = round_number

    def verdict_ready(self):
        return True

    def wait_verdict(self):
        return VerdictReply(round=self.round, accepted_nodes=(), next_token=8, compute_s=0.01, round_trip_s=0.01)

    def close(self, cancel=True):
        pass


class QuietDrafter:
    compute_s, tokens_drafted = 0.0, 0

    def __init__(self, log):
        self.log = log

    def prefill(self, prompt):
        self.log.append("draft prefill")

    def commit(self, committed):
        pass

    def propose(self, room):
        return TokenTree.empty()

    def grow_ahead(self, target_ahead):
        return False


@pytest.mark.parametrize("draft_prefill_first", [True, False])
def test_where_cores_are_shared_the_draft_reads_the_prompt_after_the_first_token(draft_prefill_first):
    log = []
    plan = SessionPlan("s", (1, 2, 3), DecodingParams(), 256, draft_prefill_first=draft_prefill_first)
    session = SpeculativeSession(plan, ScriptedLink(log), lambda: QuietDrafter(log),
                                 StopChecker(StoppingParams(max_new_tokens=3), frozenset(), str), lambda: 2)
    events = session.run()
    first = next(events)
    log.append("first token sent")
    rest = list(events)
    assert first.token_ids == (7,) and [event.token_ids for event in rest[:-1]] == [(8,), (8,)]
    if draft_prefill_first:  # in a thread beside the verifier's prefill, joined before round 1
        assert log.count("draft prefill") == 1
    else:
        assert log == ["verifier prefill starts", "first token arrives", "first token sent", "draft prefill"]


def test_a_draft_prefilled_after_the_first_token_is_still_lossless(pair):
    config = DrafterConfig(draft_prefill_first=False)
    prompt = [1, 5, 9, 20, 33]
    with verify_server(pair.target_dir) as (verify_addr, _), \
            draft_server(pair.draft_dir, verify_addr, config) as (draft_addr, _), \
            grpc.insecure_channel(draft_addr) as channel:
        result = generate(channel, tuple(prompt), tokens=40)
    assert result.token_ids == reference_greedy(pair.target, prompt, 40, None)
    assert result.server_stats.accepted_tokens > 0


class FailingDrafter(QuietDrafter):
    def prefill(self, prompt):
        raise Cancelled("the caller went away before its work ran")


@pytest.mark.parametrize("draft_prefill_first", [True, False])
def test_a_draft_prefill_that_fails_ends_the_session_with_its_error(draft_prefill_first):
    plan = SessionPlan("s", (1, 2, 3), DecodingParams(), 256, draft_prefill_first=draft_prefill_first)
    session = SpeculativeSession(plan, ScriptedLink([]), lambda: FailingDrafter([]),
                                 StopChecker(StoppingParams(max_new_tokens=3), frozenset(), str), lambda: 2)
    events = session.run()
    assert next(events).token_ids == (7,)  # the target's first token does not wait for the draft
    with pytest.raises(Cancelled):
        next(events)
