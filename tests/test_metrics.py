"""/metrics after a generation: sessions, spec-decode counters, latencies and errors by status code."""

import urllib.request

import grpc
import pytest

from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common.metrics import ServiceMetrics
from duo.common.params import StoppingParams
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.inprocess import draft_server, verify_server
from tests.tiny_models import save_pair


def scrape(metrics: ServiceMetrics) -> dict[str, float]:
    server, _thread = metrics.serve(0, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    pair = save_pair(tmp_path_factory.mktemp("metrics"), "llama")
    verify_metrics, draft_metrics = ServiceMetrics(), ServiceMetrics()
    with verify_server(pair.target_dir, metrics=verify_metrics) as (verify_addr, _), \
            draft_server(pair.draft_dir, verify_addr, metrics=draft_metrics) as (draft_addr, _):
        with grpc.insecure_channel(draft_addr) as channel:
            request = GenerationRequest(prompt_ids=(1, 5, 9, 20), stopping=StoppingParams(max_new_tokens=30,
                                                                                          ignore_eos=True))
            result = Orchestrator(channel, timeout_s=30).generate(request, FixedBudget(4))
            with pytest.raises(grpc.RpcError):
                list(duo_pb2_grpc.DrafterStub(channel).Generate(pb.GenerateRequest(text=""), timeout=10))
    return result, scrape(verify_metrics), scrape(draft_metrics)


def test_verifier_counts_drafts_and_accepted_tokens(scraped):
    result, verify, _ = scraped
    stats = result.server_stats
    assert verify["duo_sessions_total"] == 1
    assert verify["duo_sessions_active"] == 0
    assert verify["duo_spec_decode_num_drafts_total"] == stats.rounds
    assert verify["duo_spec_decode_num_draft_tokens_total"] == stats.drafted_tokens
    assert verify["duo_spec_decode_num_accepted_tokens_total"] == stats.accepted_tokens
    per_position = sum(value for name, value in verify.items()
                       if name.startswith("duo_spec_decode_num_accepted_tokens_per_pos_total"))
    assert per_position == stats.accepted_tokens
    assert verify['duo_spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] >= \
        verify.get('duo_spec_decode_num_accepted_tokens_per_pos_total{position="1"}', 0)
    assert verify["duo_verify_compute_seconds_count"] == stats.rounds
    assert verify["duo_proposal_size_nodes_sum"] == stats.drafted_tokens


def test_drafter_reports_latencies_and_errors_by_code(scraped):
    result, _, draft = scraped
    assert draft["duo_sessions_total"] == 1
    assert draft["duo_time_to_first_token_seconds_count"] == 1
    assert draft["duo_inter_token_latency_seconds_count"] == 1
    assert draft["duo_draft_compute_seconds_count"] == result.server_stats.rounds
    assert draft['duo_rpc_errors_total{code="INVALID_ARGUMENT",method="/duo.v1.Drafter/Generate"}'] == 1


def test_sessions_that_end_normally_are_no_errors(scraped):
    """A drafter ends a finished session's Verify stream by half-closing it: the verifier ends it with OK,
    so the error counter holds real failures only (here, the one refused request)."""
    _, verify, draft = scraped
    assert [name for name in verify if name.startswith("duo_rpc_errors_total{")] == []
    assert [name for name in draft if name.startswith("duo_rpc_errors_total{")] == [
        'duo_rpc_errors_total{code="INVALID_ARGUMENT",method="/duo.v1.Drafter/Generate"}']
