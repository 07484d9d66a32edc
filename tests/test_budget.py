"""The latency-aware budget: synthetic timings in, budget out."""

import random

import pytest

from duo.common.budget import AdaptiveBudget, BudgetModel, ControllerConfig, SharedEstimates
from duo.common.events import RoundTimings


def model(verify_base_s=0.080, verify_s_per_node=0.001, acceptance=0.8, **overrides):
    """A BudgetModel; a number for ``acceptance`` means the same rate at every depth."""
    values = dict(draft_s_per_token=0.005, network_s=0.0,
                  acceptance=(acceptance,) if isinstance(acceptance, (int, float)) else tuple(acceptance),
                  verify_points=((0, verify_base_s), (16, verify_base_s + 16 * verify_s_per_node)))
    values.update(overrides)
    return BudgetModel(**values)


def test_expected_committed_is_the_geometric_sum():
    assert model(acceptance=0.5).expected_committed(3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert model(acceptance=0.0).expected_committed(8) == pytest.approx(1.0)


def test_expected_committed_multiplies_the_acceptance_of_each_depth():
    bursty = model(acceptance=(0.5, 0.9))  # deeper depths repeat the last rate
    assert bursty.expected_committed(1) == pytest.approx(1.5)
    assert bursty.expected_committed(3) == pytest.approx(1 + 0.5 + 0.45 + 0.405)
    assert bursty.all_accepted(3) == pytest.approx(0.405)


def test_round_time_overlaps_on_a_hit_and_adds_up_on_a_miss():
    always = model(acceptance=1.0, verify_s_per_node=0.0)
    assert always.round_s(4) == pytest.approx(max(0.020, 0.080))
    never = model(acceptance=0.0, verify_s_per_node=0.0)
    assert never.round_s(4) == pytest.approx(0.020 + 0.080)


def test_cheap_drafts_and_good_acceptance_buy_long_proposals():
    assert model(acceptance=0.9).best_budget(16) >= 8


def test_poor_acceptance_keeps_proposals_short():
    assert 1 <= model(acceptance=0.2).best_budget(16) <= 2


def test_verify_cost_is_interpolated_between_measured_sizes():
    measured = model(verify_points=((0, 0.054), (1, 0.088), (4, 0.094)))
    assert measured.verify_s(1) == pytest.approx(0.088)
    assert measured.verify_s(2) == pytest.approx(0.090)
    assert measured.verify_s(8) == pytest.approx(0.102)  # extrapolated from the last two sizes


def test_speculation_is_switched_off_where_it_does_not_pay():
    # A weak draft and a verifier whose cost jumps from 1 to 2 tokens (a CPU): the target alone is faster.
    weak = model(acceptance=0.3, draft_s_per_token=0.005, verify_points=((0, 0.054), (1, 0.088), (4, 0.094)))
    assert weak.best_budget(8) == 0
    strong = model(acceptance=0.8, draft_s_per_token=0.005, verify_points=((0, 0.054), (1, 0.088), (4, 0.094)))
    assert strong.best_budget(8) >= 4


def test_a_slow_drafter_gets_a_shorter_budget():
    fast = model(draft_s_per_token=0.002).best_budget(16)
    slow = model(draft_s_per_token=0.040).best_budget(16)
    assert slow < fast


def test_network_latency_is_hidden_by_drafting_more():
    # With a round trip to cover, the drafter has time for more tokens before the verdict comes back.
    near = model(draft_s_per_token=0.010, acceptance=0.85).best_budget(24)
    far = model(draft_s_per_token=0.010, acceptance=0.85, network_s=0.100).best_budget(24)
    assert far > near


def synthetic_round(rng, budget, acceptance, draft_s_per_token, verify_s, network_s):
    accepted = 0
    while accepted < budget and rng.random() < acceptance:  # each token accepted with probability `acceptance`
        accepted += 1
    return RoundTimings(
        draft_compute_s=draft_s_per_token * budget, verify_compute_s=verify_s,
        verify_round_trip_s=verify_s + network_s, proposal_size=budget, accepted_size=accepted,
        draft_tokens=budget,
    )


def test_controller_learns_from_rounds_and_adapts_when_latency_changes():
    controller = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=24))
    rng = random.Random(0)
    assert controller.initial() == 4
    for _ in range(30):
        controller.after_round(synthetic_round(rng, controller.budget, 0.8, 0.010, 0.080, 0.0))
    estimates = controller.model()
    assert estimates.draft_s_per_token == pytest.approx(0.010, rel=0.01)
    assert 0 in dict(estimates.verify_points)  # it measured the verifier alone once
    assert estimates.network_s == pytest.approx(0.0, abs=1e-6)
    near = controller.budget
    for _ in range(30):
        controller.after_round(synthetic_round(rng, controller.budget, 0.8, 0.010, 0.080, 0.150))
    assert controller.model().network_s == pytest.approx(0.150, rel=0.05)
    assert controller.budget > near


def test_controller_estimates_per_token_acceptance_without_truncation_bias():
    controller = AdaptiveBudget(ControllerConfig(acceptance_memory=1000))
    # a = 0.75: rounds of budget 4 accept 0..4 tokens in geometric proportions (counts per 256 rounds)
    counts = {0: 64, 1: 48, 2: 36, 3: 27, 4: 81}
    rounds = [accepted for accepted, count in counts.items() for _ in range(count)]
    random.Random(0).shuffle(rounds)
    for accepted in rounds:
        controller.after_round(RoundTimings(0.04, 0.08, 0.08, 4, accepted, 4))
    for depth in range(1, 5):
        assert controller.model().acceptance_at(depth) == pytest.approx(0.75, abs=0.03), depth


def bursty_accepted(rng: random.Random, budget: int) -> int:
    """A draft that agrees in runs: half the rounds start on a hard token (nothing accepted); otherwise each
    further token is accepted with probability 0.9."""
    if rng.random() < 0.5:
        return 0
    accepted = 1
    while accepted < budget and rng.random() < 0.9:
        accepted += 1
    return accepted


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_controller_learns_that_acceptance_comes_in_runs_and_proposes_nearly_the_best_budget(seed):
    rng = random.Random(seed)
    controller = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=12, min_budget=1))
    successes = trials = 0
    for _ in range(200):
        budget = controller.budget
        accepted = bursty_accepted(rng, budget)
        successes, trials = successes + accepted, trials + accepted + (accepted < budget)
        controller.after_round(RoundTimings(0.005 * budget, 0.080, 0.080, budget, accepted, budget))
    estimates = controller.model()
    assert estimates.acceptance_at(1) == pytest.approx(0.5, abs=0.15)
    assert estimates.acceptance_at(3) == pytest.approx(0.9, abs=0.08)
    truth = model(acceptance=(0.5, 0.9), draft_s_per_token=0.005, verify_s_per_node=0.0)
    best_rate = max(truth.tokens_per_s(k) for k in range(13))
    assert truth.tokens_per_s(controller.budget) >= 0.96 * best_rate
    # One rate pooled over all depths (the model before per-depth acceptance) proposes too little.
    pooled_choice = model(acceptance=successes / trials, draft_s_per_token=0.005, verify_s_per_node=0.0).best_budget(12)
    assert truth.tokens_per_s(controller.budget) > truth.tokens_per_s(pooled_choice)


def test_drafting_hidden_behind_verification_lets_larger_budgets_pay():
    """The same rounds, once from a drafter that says most of its drafting was done ahead (behind the
    verifier) and once from one that does not: the first controller proposes more."""
    def run(reports_ahead: bool) -> int:
        controller = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=12, min_budget=1, probe_every=4))
        for _ in range(120):
            budget = controller.budget
            draft_s = 0.006 * (budget + 6)  # the proposal and drafting ahead for the next round
            delay_s = 0.004 + 0.001 * budget  # what the verdict left to draft before sending
            controller.after_round(RoundTimings(draft_s, 0.030 + 0.002 * budget, 0.032 + 0.002 * budget, budget,
                                                min(budget, 3), budget + 6, budget,
                                                draft_ahead_s=draft_s - delay_s if reports_ahead else 0.0))
        return controller.budget

    told, not_told = run(True), run(False)
    assert told > not_told
    estimates = AdaptiveBudget().model()
    assert estimates.delay_points == ()  # nothing reported yet: the hit/miss model


def test_controller_turns_speculation_off_and_keeps_probing():
    controller = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=8, probe_every=5))
    cost = {0: 0.054, 1: 0.088}
    budgets = []
    for _ in range(40):
        budget = controller.budget
        budgets.append(budget)
        verify_s = cost.get(budget, 0.094)
        accepted = 1 if budget >= 3 else 0  # acceptance 0.25 per token
        controller.after_round(RoundTimings(0.005 * budget, verify_s, verify_s, budget, min(accepted, budget),
                                            budget))
    assert budgets[-20:].count(0) >= 14  # mostly off
    assert any(b > 0 for b in budgets[-20:])  # but it keeps probing


def test_a_fully_accepted_tree_path_is_no_rejection_at_the_next_depth():
    tree = AdaptiveBudget(ControllerConfig(prior_acceptance=0.5, acceptance_memory=1000))
    chain = AdaptiveBudget(ControllerConfig(prior_acceptance=0.5, acceptance_memory=1000))
    for _ in range(20):
        # 5 nodes, 3 deep, the deepest path accepted: nothing was tried (or rejected) at depth 4
        tree.after_round(RoundTimings(0.02, 0.08, 0.08, 5, 3, 5, proposal_depth=3))
        chain.after_round(RoundTimings(0.02, 0.08, 0.08, 5, 3, 5, proposal_depth=5))
    assert tree.model().acceptance_at(3) > 0.9
    assert tree.model().acceptance_at(4) > 0.9, "an untried depth takes its shallower neighbour's rate"
    assert chain.model().acceptance_at(4) < 0.2, "a chain of 5 that stopped at 3 was rejected at depth 4"


def test_a_tree_commits_along_its_depth_not_its_size():
    chain = model(acceptance=0.8)
    tree = model(acceptance=0.8, depth_points=((4, 3.0), (8, 5.5)))
    assert tree.expected_committed(4) == pytest.approx(chain.expected_committed(3))
    assert tree.expected_committed(8) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096 + 0.32768 + 0.5 * 0.262144)
    assert tree.depth(16) == pytest.approx(11.0)  # the nearest measured size's depth per node
    assert tree.depth(1) == pytest.approx(1.0)


def test_controller_measures_the_depth_of_the_trees_it_gets():
    controller = AdaptiveBudget(ControllerConfig(initial_budget=6, max_budget=12))
    for _ in range(10):
        controller.after_round(RoundTimings(0.02, 0.08, 0.08, 6, 2, 6, proposal_depth=4))
    assert controller.model().depth(6) == pytest.approx(4.0)


def test_from_one_measured_size_cost_grows_with_the_tokens():
    # After a session's first round (4 draft tokens, 5 tokens scored) nothing says how cost grows: assuming
    # it does not made a 9-token proposal look free.
    one_point = model(verify_points=((4, 0.050),))
    assert one_point.verify_s(9) == pytest.approx(0.100)
    assert one_point.verify_s(0) == pytest.approx(0.010)


def test_controller_grows_one_size_past_the_largest_it_has_measured():
    # Acceptance 1 and a free verifier: every budget up to the maximum would pay, but untried sizes are guesses.
    controller = AdaptiveBudget(ControllerConfig(initial_budget=2, max_budget=16, min_budget=1))
    budgets = []
    for _ in range(10):
        budget = controller.budget
        budgets.append(budget)
        controller.after_round(RoundTimings(0.001 * budget, 0.050, 0.050, budget, budget, budget))
    assert all(budget <= max(budgets[:i]) + 1 for i, budget in enumerate(budgets[1:], 1)), budgets
    assert budgets[-1] >= 7, budgets  # yet it keeps growing


def warm_rounds(controller: AdaptiveBudget, rounds: int, rng: random.Random) -> list[int]:
    """Rounds of a draft accepted at 0.8 per token, drafting 5 ms a token, on a verifier costing 80 ms + 1 ms a
    node; returns the budgets the controller chose."""
    budgets = []
    for _ in range(rounds):
        budget = controller.budget
        budgets.append(budget)
        controller.after_round(synthetic_round(rng, budget, 0.8, 0.005, 0.080 + 0.001 * budget, 0.0))
    return budgets


def test_a_session_starts_from_what_earlier_sessions_on_the_verifier_learnt():
    shared = SharedEstimates()
    rng = random.Random(5)
    first = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=16), shared)
    warm_rounds(first, 60, rng)
    learnt = first.model()
    assert shared.recall() == learnt  # every round leaves its estimates

    second = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=16), shared)
    assert second.initial() == learnt.best_budget(16) > 4  # not the cold initial budget
    assert second.model().verify_points == learnt.verify_points
    budgets = warm_rounds(second, 4, rng)
    assert budgets[0] == learnt.best_budget(16) and budgets[2] == 0  # it still measures the verifier alone once

    cold = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=16), shared)
    shared.forget()  # another verifier
    assert AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=16), shared).initial() == 4
    assert cold.initial() == learnt.best_budget(16)


def test_probes_space_out_while_speculation_keeps_not_paying():
    controller = AdaptiveBudget(ControllerConfig(initial_budget=4, max_budget=8, probe_every=5, max_probe_every=40))
    probes = []
    for round_number in range(400):
        budget = controller.budget
        if budget > 0 and round_number > 3:  # after the first rounds, before anything was measured
            probes.append(round_number)
        verify_s = 0.054 if budget == 0 else 0.094  # a draft row costs a whole step; nothing is accepted
        controller.after_round(RoundTimings(0.005 * budget, verify_s, verify_s, budget, 0, budget))
    gaps = [later - earlier for earlier, later in zip(probes, probes[1:])]
    assert gaps == sorted(gaps), gaps  # each probe that finds nothing waits longer for the next
    assert 40 <= gaps[-1] <= 42, gaps  # up to max_probe_every
    assert len(probes) <= 400 / 40 + 3, probes  # not every probe_every rounds: 80 probes
