"""Context copying (draft_service/context_copy.py) and the greedy tree's calibrated child chances
(draft_service/draft_tree.CalibratedProbability), and both inside the real TreeDrafter."""

from __future__ import annotations

import pytest
import torch

from duo.draft_service.context_copy import MAX_MATCH, ContextCopy, Copy
from duo.draft_service.draft_tree import CalibratedProbability
from duo.draft_service.tree_drafter import TreeDrafter
from duo.common.params import DecodingParams
from tests.tiny_models import VOCAB_SIZE, build_model


def test_suggests_what_followed_the_latest_occurrence_of_the_longest_suffix():
    copy = ContextCopy()
    #                 0  1  2  3  4  5  6  7  8  9
    copy.observe([7, 1, 2, 3, 9, 1, 2, 4, 1, 2])
    suggestion = copy.suggest()
    # "1 2" occurred at 1-2 (then 3) and 5-6 (then 4): the latest wins; no longer suffix recurs
    assert (suggestion.token, suggestion.match) == (4, 2)
    copy.observe([7, 1, 2, 3, 9, 1, 2, 4, 1, 2, 4, 8, 3, 9, 1])
    # "3 9 1" recurs (positions 3-5, then 2), longer than "9 1"
    assert (copy.suggest().token, copy.suggest().match) == (2, 3)


def test_draft_path_extends_the_committed_suffix():
    copy = ContextCopy()
    copy.observe([5, 6, 7, 8, 9, 5])
    assert copy.suggest() is None  # a one-token match is not a copy
    assert copy.suggest((6,)).token == 7  # committed "5" + path "6" matches "5 6"
    assert copy.suggest((6, 7)) == Copy(8, 3, copy.rate(3))
    assert copy.suggest((1, 2)) is None


def test_hit_rates_are_learned_per_match_length_from_the_committed_tokens():
    repeating = ContextCopy()
    repeating.observe([1, 2, 3, 4, 5, 6] * 6)
    varying = ContextCopy()
    # "1 2" always recurs, and is followed by something new each time
    varying.observe([token for k in range(10) for token in (1, 2, 10 + k)])
    assert repeating.rate(MAX_MATCH) > 0.8  # long matches kept being right
    assert varying.rate(2) < 0.2  # two-token matches kept being wrong
    assert varying.rate(MAX_MATCH) == 0.5  # never tried: the prior


def test_a_sequence_that_does_not_extend_the_last_is_indexed_afresh():
    copy = ContextCopy()
    copy.observe([1, 2, 3, 1, 2])
    assert copy.suggest().token == 3
    copy.observe([1, 2, 4, 1, 2])
    assert copy.suggest().token == 4


def test_mix_raises_the_copy_to_its_rate_and_keeps_a_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    mixed = ContextCopy().mix(probs, Copy(token=3, match=4, rate=0.6))
    assert mixed[3] == pytest.approx(0.6)
    assert mixed.sum() == pytest.approx(1.0)
    # the other tokens keep their proportions
    assert (mixed[:3] / mixed[:3].sum()).tolist() == pytest.approx((probs[:3] / probs[:3].sum()).tolist())
    assert int(mixed.argmax()) == 3


def test_mix_leaves_a_distribution_that_already_favours_the_copy():
    probs = torch.tensor([0.1, 0.9, 0.0])
    assert torch.equal(ContextCopy().mix(probs, Copy(1, 2, 0.5)), probs)
    assert torch.equal(ContextCopy().mix(probs, None), probs)
    one_hot = torch.tensor([1.0, 0.0, 0.0])
    moved = ContextCopy().mix(one_hot, Copy(2, 2, 0.5))
    assert moved.tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_calibration_starts_at_the_draft_probability_and_learns_a_correction():
    calibration = CalibratedProbability()
    top = [0.45, 0.3, 0.1]
    assert calibration.through(top, 0) == pytest.approx(0.45)
    for _ in range(40):  # tokens the draft gives ~0.45 are never the target's
        calibration.record([0.44, 0.2], 0, accepted=False)
    assert calibration.through(top, 0) < 0.1
    assert calibration.through(top, 1) == pytest.approx(0.3)  # another bucket: untouched
    assert calibration.through([0.42], 0) < calibration.through([0.48], 0)  # order kept inside a bucket


def repeating_drafter(params: DecodingParams, context_copy: bool, max_branches: int = 1) -> TreeDrafter:
    torch.manual_seed(0)
    model = build_model("llama").eval()
    drafter = TreeDrafter(model, params, VOCAB_SIZE, frozenset({2}), 256, lambda: max_branches, True, context_copy)
    drafter.prefill([5, 6, 7, 8, 9] * 4 + [5, 6])
    return drafter


def test_the_drafter_proposes_the_copy_of_a_long_repeat():
    # A random tiny model knows nothing; the committed sequence has repeated "5 6 7 8 9" four times
    proposal = repeating_drafter(DecodingParams(), context_copy=True).propose(5)
    assert list(proposal.token_ids) == [7, 8, 9, 5, 6]
    without = repeating_drafter(DecodingParams(), context_copy=False).propose(5)
    assert list(without.token_ids) != [7, 8, 9, 5, 6]


def test_sampled_drafts_carry_the_mixed_distribution_they_were_drawn_from():
    # unseeded sampling: the verifier accepts each token against the distribution it was drawn from
    drafter = repeating_drafter(DecodingParams(temperature=1.0), context_copy=True, max_branches=2)
    proposal = drafter.propose(4)
    assert proposal.draft_probs is not None
    root_rows = [row for row, parent in enumerate(proposal.parents) if parent == -1]
    first = proposal.draft_probs[root_rows[0]]
    assert float(first[7]) >= ContextCopy().rate(MAX_MATCH)  # the copy's share at least its prior rate
    assert float(first.sum()) == pytest.approx(1.0, abs=1e-5)


def test_seeded_drafts_carry_no_distributions():
    # seeded sampling: the verifier fixes each token by the seed and its position, not by the draft's odds
    drafter = repeating_drafter(DecodingParams(temperature=1.0, seed=3), context_copy=True, max_branches=2)
    proposal = drafter.propose(4)
    assert len(proposal) == 4 and proposal.draft_probs is None
