"""Resuming a generation after losing its draft service: the request continued from the tokens delivered
goes on exactly as the lost call would have (tokens, text, stop strings, max_new_tokens), and duo-client's
orchestrator does it on its own when its draft service dies mid-generation and comes back — in embedded
mode, brought back by the client itself."""

import os
import signal

import grpc

from duo.client.embedded import EmbeddedConfig, embedded_services
from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common import codec
from duo.common.events import FinishedEvent
from duo.common.params import StoppingParams
from duo.common.resume import ResumePolicy
from duo.common.stopping import FinishReason
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.inprocess import draft_server, verify_server
from tests.tiny_models import reference_greedy, save_pair, word_tokenizer

PROMPT = [1, 5, 9]


def generate(draft_addr: str, request: pb.GenerateRequest) -> tuple[list[int], str, FinishedEvent]:
    """Streamed token ids, streamed text, and the finish."""
    tokens, text = [], ""
    with grpc.insecure_channel(draft_addr) as channel:
        for message in duo_pb2_grpc.DrafterStub(channel).Generate(request, timeout=60):
            event = codec.event_from_pb(message)
            if isinstance(event, FinishedEvent):
                return tokens, text, event
            if event is not None:
                tokens.extend(event.token_ids)
                text += event.text_delta
    raise AssertionError("no Finished event")


def test_a_continued_request_streams_exactly_what_the_lost_call_had_left(tiny_pair, tiny_services):
    tokenizer = word_tokenizer()
    reference = reference_greedy(tiny_pair.target, PROMPT, 30, eos_token_id=None)
    words = tokenizer.decode(reference[20:22]).split(" ")
    stop = words[0][-1:] + " " + words[1][:2]  # spans two tokens, found after the resume point
    stopping = pb.StoppingParams(max_new_tokens=30, stop_strings=[stop], ignore_eos=True)
    whole = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), stopping=stopping,
                               budget=pb.DraftBudget(max_draft_tokens=3))
    all_tokens, all_text, all_finished = generate(tiny_services.draft_addr, whole)
    for delivered in (1, len(all_tokens) // 2, len(all_tokens) - 1, len(all_tokens)):
        continued = pb.GenerateRequest()
        continued.CopyFrom(whole)
        continued.continuation.delivered_token_ids.extend(all_tokens[:delivered])
        tokens, _, finished = generate(tiny_services.draft_addr, continued)
        assert all_tokens[:delivered] + tokens == all_tokens
        assert (finished.text, finished.reason) == (all_finished.text, FinishReason.STOP)
        assert finished.stats.new_tokens == all_finished.stats.new_tokens


def test_the_orchestrator_carries_on_when_its_draft_service_dies_and_comes_back(tmp_path):
    pair = save_pair(tmp_path, "llama", context=2048)
    expected = reference_greedy(pair.target, PROMPT, 600, eos_token_id=None)
    received_text = []
    with verify_server(pair.target_dir) as (verify_addr, _):
        first = draft_server(pair.draft_dir, verify_addr)
        draft_addr, _ = first.__enter__()
        port = int(draft_addr.rsplit(":", 1)[1])
        replacement = []

        def on_text(text: str) -> None:  # the draft service dies after some text arrived, and a new one starts
            received_text.append(text)
            if len(received_text) == 5:
                first.__exit__(None, None, None)
                replacement.append(draft_server(pair.draft_dir, verify_addr, port=port))
                replacement[0].__enter__()

        with grpc.insecure_channel(draft_addr) as channel:
            orchestrator = Orchestrator(channel, timeout_s=120, resume=ResumePolicy(first_pause_s=0.2))
            result = orchestrator.generate(GenerationRequest(prompt_ids=tuple(PROMPT), stopping=StoppingParams(
                max_new_tokens=600, ignore_eos=True)), FixedBudget(2), on_text)
        replacement[0].__exit__(None, None, None)
    assert result.drafter_resumes >= 1
    assert result.token_ids == expected
    assert "".join(received_text) == result.text  # every piece once, none skipped


def test_embedded_mode_restarts_a_dead_child_and_the_generation_carries_on(tmp_path):
    pair = save_pair(tmp_path, "llama", context=2048)
    expected = reference_greedy(pair.target, PROMPT, 500, eos_token_id=None)
    config = EmbeddedConfig(str(pair.target_dir), str(pair.draft_dir), verify_threads=1, draft_threads=1,
                            verify_device="cpu")
    received_text = []
    with embedded_services(config) as addresses, grpc.insecure_channel(addresses.draft) as channel:
        verify_pid, draft_pid = addresses.pids

        def on_text(text: str) -> None:  # the draft service dies, then (served by its successor) the verifier
            received_text.append(text)
            if len(received_text) == 5:
                os.kill(draft_pid, signal.SIGKILL)
            if len(received_text) == 60:
                os.kill(verify_pid, signal.SIGKILL)

        orchestrator = Orchestrator(channel, timeout_s=300, resume=ResumePolicy(attempts=10, within_s=120))
        result = orchestrator.generate(GenerationRequest(prompt_ids=tuple(PROMPT), stopping=StoppingParams(
            max_new_tokens=500, ignore_eos=True)), FixedBudget(2), on_text)
    assert len(received_text) > 60  # both faults happened mid-generation
    assert result.drafter_resumes >= 1 and result.server_stats.verifier_resumes >= 1
    assert result.token_ids == expected
    assert "".join(received_text) == result.text
