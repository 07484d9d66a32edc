"""Lossless greedy: duo's tokens equal HF ``generate(do_sample=False)`` of the target alone, token for
token, through the real gRPC services, for Llama and GPT-2 shaped pairs, every budget, and every way a
generation can end (EOS inside a draft, stop strings, max_new_tokens)."""

import grpc
import pytest

from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common.params import StoppingParams
from duo.common.stopping import FinishReason
from tests.inprocess import running_pair
from tests.tiny_models import reference_greedy, save_pair, word_tokenizer

PROMPTS = [[1, 5, 9, 20], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]


def duo_generate(draft_addr, prompt, budget, stopping, max_branches=1):
    with grpc.insecure_channel(draft_addr) as channel:
        request = GenerationRequest(prompt_ids=tuple(prompt), stopping=stopping)
        return Orchestrator(channel, timeout_s=60).generate(request, FixedBudget(budget, max_branches))


@pytest.mark.parametrize("max_branches", [1, 3])
@pytest.mark.parametrize("budget", range(0, 9))
@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokens_equal_target_alone(tiny_pair, tiny_services, prompt, budget, max_branches):
    expected = reference_greedy(tiny_pair.target, prompt, 40, eos_token_id=2)
    result = duo_generate(tiny_services.draft_addr, prompt, budget, StoppingParams(max_new_tokens=40), max_branches)
    assert result.token_ids == expected
    expected_reason = FinishReason.EOS if expected[-1] == 2 else FinishReason.LENGTH
    assert result.finish_reason == expected_reason
    if budget > 0:
        stats = result.server_stats
        assert stats.drafted_tokens > 0
        assert 0 < stats.accepted_tokens < stats.drafted_tokens  # both acceptance and rejection happened
        assert stats.rounds < len(expected)  # speculation saved verification rounds
        for timings in result.rounds:  # every round reports its tree's depth (what the budget model needs)
            assert timings.accepted_size <= timings.proposal_depth <= timings.proposal_size
            if max_branches == 1:
                assert timings.proposal_depth == timings.proposal_size


@pytest.mark.parametrize("max_branches", [1, 3])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
@pytest.mark.parametrize("budget", [0, 1, 5, 8])
def test_max_new_tokens_is_exact(tiny_pair, tiny_services, budget, max_new_tokens, max_branches):
    expected = reference_greedy(tiny_pair.target, PROMPTS[0], max_new_tokens, eos_token_id=None)
    result = duo_generate(tiny_services.draft_addr, PROMPTS[0], budget,
                          StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True), max_branches)
    assert result.token_ids == expected
    assert len(result.token_ids) == max_new_tokens
    assert result.finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eos_inside_a_draft_ends_exactly(tmp_path, arch):
    prompt = PROMPTS[0]
    free_run = reference_greedy(save_pair(tmp_path / "probe", arch).target, prompt, 60, eos_token_id=None)
    # An EOS id that first appears deep into the target's output, so it lands inside some proposal.
    position = next(i for i in range(12, len(free_run)) if free_run[i] not in free_run[:i])
    eos = free_run[position]
    pair = save_pair(tmp_path / "eos", arch, eos_token_id=eos)
    expected = reference_greedy(pair.target, prompt, 60, eos_token_id=eos)
    assert expected[-1] == eos and len(expected) == position + 1
    with running_pair(pair.target_dir, pair.draft_dir) as services:
        for budget, max_branches in ((2, 1), (5, 1), (8, 1), (5, 3), (8, 3)):
            result = duo_generate(services.draft_addr, prompt, budget, StoppingParams(max_new_tokens=60), max_branches)
            assert result.token_ids == expected, (budget, max_branches)
            assert result.finish_reason == FinishReason.EOS


@pytest.mark.parametrize("max_branches", [1, 3])
@pytest.mark.parametrize("budget", [0, 3, 8])
def test_stop_string_spanning_tokens_ends_exactly(tiny_pair, tiny_services, budget, max_branches):
    tokenizer = word_tokenizer()
    reference = reference_greedy(tiny_pair.target, PROMPTS[0], 40, eos_token_id=None)
    # A stop string made of the end of one word and the start of the next, found deep in the output.
    words = tokenizer.decode(reference[10:12]).split(" ")
    stop = words[0][-1:] + " " + words[1][:2]
    full_text = tokenizer.decode(reference)
    cut = full_text.index(stop)
    needed = next(n for n in range(1, len(reference) + 1) if stop in tokenizer.decode(reference[:n]))
    result = duo_generate(tiny_services.draft_addr, PROMPTS[0], budget,
                          StoppingParams(max_new_tokens=40, stop_strings=("never-there", stop), ignore_eos=True),
                          max_branches)
    assert result.finish_reason == FinishReason.STOP
    assert result.text == full_text[:cut]
    # The stop string begins in the last character of one word and ends in the next: the result's tokens
    # are those before both, whose decoding the text starts with.
    assert result.token_ids == reference[:needed - 2]
    assert result.text.startswith(tokenizer.decode(result.token_ids))


def test_draft_of_another_architecture_is_still_lossless(tmp_path):
    pair = save_pair(tmp_path, "llama", draft_arch="gpt2")
    expected = reference_greedy(pair.target, PROMPTS[1], 30, eos_token_id=2)
    with running_pair(pair.target_dir, pair.draft_dir) as services:
        for max_branches in (1, 3):
            result = duo_generate(services.draft_addr, PROMPTS[1], 4, StoppingParams(max_new_tokens=30), max_branches)
            assert result.token_ids == expected, max_branches
