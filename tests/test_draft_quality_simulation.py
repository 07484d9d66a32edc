"""The draft-quality benchmark's round simulations (benchmarks/draft_quality.py) are exact: the one for duo's
drafter agrees with the plain greedy-chain simulation where they must, and reproduces the target's tokens;
the rounds they replay (``duo.common.greedy_rounds``) commit every token once."""

from __future__ import annotations

import pytest

from benchmarks.draft_quality import greedy_decode, simulate_drafter, simulate_speculative
from duo.common.greedy_rounds import replay_greedy_rounds
from tests.tiny_models import VOCAB_SIZE, build_model, perturbed_copy

PROMPT = [1, 5, 9, 20, 33, 7]


@pytest.mark.parametrize("budget, rounds", [(0, 10), (1, 5), (4, 2), (20, 1)])
def test_a_replay_accepting_every_proposal_commits_a_full_round_each_time(budget, rounds):
    starts = []

    def play_round(done, room):
        starts.append((done, room))
        return room

    assert replay_greedy_rounds(10, budget, play_round) == (10, rounds)
    assert all(done + room < 10 for done, room in starts)  # the target's own token always fits


def test_a_replay_accepting_nothing_commits_the_targets_token_alone():
    assert replay_greedy_rounds(7, 4, lambda done, room: 0) == (7, 7)


@pytest.fixture(scope="module")
def pair():
    target = build_model("llama").eval()
    draft = perturbed_copy(target, 0.05).eval()
    continuation, _ = greedy_decode(target, PROMPT, 40, eos_id=-1)
    return target, draft, continuation


@pytest.mark.parametrize("budget", [1, 3, 6])
def test_drafter_chains_without_copying_match_the_plain_chain_simulation(pair, budget):
    _, draft, continuation = pair
    plain = simulate_speculative(draft, PROMPT, continuation, budget)
    drafter = simulate_drafter(draft, PROMPT, continuation, budget, 1, VOCAB_SIZE, eos_id=-1, context_copy=False)
    assert drafter == plain
    assert plain[0] == len(continuation)  # every target token committed exactly once
    assert len(continuation) / plain[1] > 1.2  # the draft is close enough that rounds commit several tokens


def test_trees_commit_each_target_token_exactly_once(pair):
    _, draft, continuation = pair
    committed, rounds = simulate_drafter(draft, PROMPT, continuation, 6, 3, VOCAB_SIZE, eos_id=-1)
    assert committed == len(continuation)
    assert 1 <= rounds <= len(continuation)


def test_a_draft_that_is_the_target_commits_a_full_budget_every_round(pair):
    target, _, continuation = pair
    committed, rounds = simulate_drafter(target, PROMPT, continuation, 4, 1, VOCAB_SIZE, eos_id=-1, context_copy=False)
    assert rounds == -(-len(continuation) // 5)  # 4 drafted + 1 of the target's own per round
    assert simulate_speculative(target, PROMPT, continuation, 4) == (committed, rounds)
