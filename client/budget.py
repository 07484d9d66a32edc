"""The latency-aware draft budget: choose the next proposal size to maximise committed tokens per second.

From the timings each round reports, the controller keeps running estimates of
  draft_s_per_token   drafter compute per drafted token
  verify_s(n)         verifier compute for a proposal of n nodes, measured per size; where the verifier
                      batches sessions, per size of its whole pass (below)
  network_s           round trip minus verifier compute and minus the wait for the pass (network,
                      serialisation)
  a_d                 acceptance at depth d: the chance the target accepts draft token d given that it
                      accepted the d - 1 before it, measured per depth
and picks the budget k maximising

    expected committed tokens per round   1 + s_1 + s_2 + ... + s_k        (s_j = a_1 a_2 ... a_j)
    ─────────────────────────────────── = ────────────────────────────────────────────────────
    expected seconds per round            hit * max(T_draft(k), RTT + T_verify(k))
                                          + (1 - hit) * (T_draft(k) + RTT + T_verify(k))

over k = 0 (no speculation) .. max, with T_verify measured per proposal size (not assumed linear); for a
token tree of k nodes the sum runs to its depth D(k), measured per size like T_verify

where hit = s_(k+1) is the chance that the whole proposal and the drafter's guess of the target's next
token are accepted — then the next proposal was drafted during verification and the round costs only the
slower of the two sides (drafting and verification overlap, DuoDecoding's T_draft ≈ RTT + T_verify
balance); otherwise the drafter starts over after the verdict. Pure: numbers in, a budget out.

A drafter that reports which part of its drafting was done ahead, behind verification (RoundTimings.
draft_ahead_s), lets the controller measure instead of model that: a round then costs the drafting that
delayed the proposal, measured per proposal size (drafting ahead stops when the verdict arrives), plus
RTT + T_verify(k). Drafting ahead keeps part of the next tree, so this delay grows more slowly with k than
the whole proposal's drafting, and larger budgets pay sooner than the hit/miss model says.

A verifier that batches sessions scores every session's proposal in one pass, whose time grows with all of
them: the controller then measures the pass's time per number of tokens in it, and costs a budget of k as a
pass in which each of the sessions that share it (measured: their mean number) proposes k. Each session
choosing that way maximises the committed tokens of the whole pass per second (SmartSpec's goodput), so
proposals shrink as the verifier fills up: a draft token that the target would accept half the time costs
the same row as a session's own next token, which it always gets.

The wait for a pass is left out of network_s (the verifier reports it with each verdict): it follows the
other sessions' schedules, not this session's budget. Counted in, it dilutes what a draft row costs exactly
when the verifier is busiest (a round that waits anyway seems to get its draft rows verified for little), so
every session keeps speculating and every pass swells with all their draft rows.

Acceptance is measured per depth because it is not the same at every depth: a distilled draft's agreement
comes in runs (easy stretches of text, where it keeps agreeing, and hard ones, where it misses at once), so
a_1 is low and the later a_d are high. One pooled rate would make long proposals look worse than they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from duo_common.events import RoundTimings


@dataclass(frozen=True)
class BudgetModel:
    """A snapshot of the estimates; ``best_budget`` and ``tokens_per_s`` are pure functions of it."""

    draft_s_per_token: float
    # (n, seconds of a verifier pass over n + 1 tokens, as a session alone proposing n nodes makes), ascending
    verify_points: tuple[tuple[int, float], ...]
    network_s: float
    acceptance: tuple[float, ...]  # a_1, a_2, ...: acceptance at each depth; deeper depths repeat the last
    depth_points: tuple[tuple[int, float], ...] = ()  # (proposal size, mean tree depth); none: chains
    # (proposal size, drafting that delayed sending the proposal): none when the drafter does not report
    # what it drafted ahead; then a round is modelled from the draft's cost per token and the hit rate
    delay_points: tuple[tuple[int, float], ...] = ()
    sharing: float = 1.0  # sessions per verifier pass (a verifier that batches); each proposes as much

    def verify_s(self, nodes: int) -> float:
        """Verifier compute for a proposal of ``nodes`` in a pass shared by ``sharing`` sessions proposing as
        many: measured, else linearly inter-/extrapolated.

        Measured, not assumed linear: on a CPU the cost of a forward jumps from 1 to 2 tokens and then
        flattens (matrix kernels change with the row count)."""
        return _interpolated(self.verify_points, round(self.sharing * (nodes + 1)) - 1)

    def acceptance_at(self, depth: int) -> float:
        """a_depth (depth >= 1), clamped to [0, 1]."""
        if not self.acceptance:
            return 0.0
        return min(max(self.acceptance[min(depth, len(self.acceptance)) - 1], 0.0), 1.0)

    def all_accepted(self, depth: int) -> float:
        """s_depth: the chance that the first ``depth`` draft tokens are all accepted."""
        probability = 1.0
        for d in range(1, depth + 1):
            probability *= self.acceptance_at(d)
        return probability

    def depth(self, nodes: int) -> float:
        """Mean depth of a proposal of ``nodes``: measured, else the nearest measured size's depth per node
        times ``nodes`` (a chain, depth = nodes, where none is measured). A tree is shallower than its size."""
        if nodes <= 0 or not self.depth_points:
            return float(max(nodes, 0))
        size, depth = min(self.depth_points, key=lambda point: (abs(point[0] - nodes), point[0]))
        return depth if size == nodes else min(float(nodes), max(1.0, depth / size * nodes))

    def expected_committed(self, budget: int) -> float:
        depth = self.depth(budget)
        whole = int(depth)
        committed = 1.0 + sum(self.all_accepted(j) for j in range(1, whole + 1))
        return committed + (depth - whole) * self.all_accepted(whole + 1)

    def round_s(self, budget: int) -> float:
        verify_s = self.network_s + self.verify_s(budget)
        if self.delay_points:  # measured: drafting ahead stops at the verdict, only the delay adds to a round
            return _interpolated(self.delay_points, budget) + verify_s
        draft_s = self.draft_s_per_token * budget
        hit = self.all_accepted(round(self.depth(budget)) + 1)
        return hit * max(draft_s, verify_s) + (1 - hit) * (draft_s + verify_s)

    def tokens_per_s(self, budget: int) -> float:
        return self.expected_committed(budget) / max(self.round_s(budget), 1e-9)

    def best_budget(self, max_budget: int, min_budget: int = 0) -> int:
        return max(range(min_budget, max_budget + 1), key=lambda k: (self.tokens_per_s(k), -k))


def _interpolated(points: tuple[tuple[int, float], ...], size: int) -> float:
    """The value at ``size`` of (size, value) points sorted by size: measured, else linearly inter- or
    extrapolated from the nearest two (one point: its value); never negative."""
    if not points:
        return 0.0
    for at, value in points:
        if at == size:
            return value
    if len(points) == 1:
        return points[0][1]
    below = [p for p in points if p[0] < size]
    above = [p for p in points if p[0] > size]
    (x0, y0), (x1, y1) = (below[-1], above[0]) if below and above else (points[-2:] if below else points[:2])
    return max(0.0, y0 + (y1 - y0) * (size - x0) / (x1 - x0))


class _Ewma:
    def __init__(self, initial: float, weight: float):
        self.value, self._weight, self.samples = initial, weight, 0

    def update(self, sample: float) -> None:
        # The first samples count fully, so the prior fades fast; then exponential forgetting.
        weight = max(self._weight, 1.0 / (self.samples + 2))
        self.value += weight * (sample - self.value)
        self.samples += 1


class DepthAcceptance:
    """Acceptance per depth, learnt from verdicts.

    A verdict that accepted ``a`` tokens of a proposal ``k`` deep (a chain of k tokens, or a tree whose
    longest path has k) was a trial at depths 1 .. min(a + 1, k): a success at depths 1 .. a, a failure at
    depth a + 1 if a < k. For a tree, "accepted at depth d" means some node at depth d was. Depth d's rate
    is the recency-weighted share of successes among its trials, shrunk toward depth d - 1's rate (depth 1's
    toward the prior) by ``shrinkage`` pseudo-trials, so a depth with few trials, or none yet, takes its
    shallower neighbour's rate.
    Depths beyond ``max_depth`` share the last one's counts.
    """

    def __init__(self, prior: float, max_depth: int, memory: float, shrinkage: float = 4.0):
        self.prior, self.shrinkage = prior, shrinkage
        self._keep = 1.0 - 1.0 / memory  # each new trial at a depth discounts that depth's older ones
        self._successes = [0.0] * max_depth
        self._trials = [0.0] * max_depth

    def observe(self, proposal_depth: int, accepted_size: int) -> None:
        for depth in range(1, min(accepted_size + 1, proposal_depth) + 1):
            index = min(depth, len(self._trials)) - 1
            self._trials[index] = self._keep * self._trials[index] + 1.0
            accepted = 1.0 if depth <= accepted_size else 0.0
            self._successes[index] = self._keep * self._successes[index] + accepted

    def rates(self) -> tuple[float, ...]:
        rates, shallower = [], self.prior
        for successes, trials in zip(self._successes, self._trials):
            shallower = (successes + self.shrinkage * shallower) / (trials + self.shrinkage)
            rates.append(shallower)
        return tuple(rates)


@dataclass(frozen=True)
class ControllerConfig:
    initial_budget: int = 4
    max_budget: int = 16
    min_budget: int = 0  # 0 lets the controller switch speculation off where it does not pay
    smoothing: float = 0.2  # weight of the newest round in every running estimate
    prior_acceptance: float = 0.6
    probe_every: int = 16  # rounds between probes of an unmeasured or abandoned option
    acceptance_memory: float = 48.0  # trials at a depth over which its acceptance is averaged
    max_branches: int = 1  # tree width sent with every budget (1: chains)


class AdaptiveBudget:
    """A BudgetPolicy for the orchestrator: re-estimates after every round, adapts when latency changes.

    It explores a little: once early on it verifies one round without a proposal (to measure what the
    verifier costs alone), and while speculation is off it proposes again every ``probe_every`` rounds, so
    its estimates of drafting and acceptance stay current."""

    def __init__(self, config: ControllerConfig = ControllerConfig()):
        self.config = config
        weight = config.smoothing
        self._draft_s_per_token = _Ewma(0.0, weight)
        self._network_s = _Ewma(0.0, weight)
        self._acceptance = DepthAcceptance(config.prior_acceptance, config.max_budget + 1, config.acceptance_memory)
        self._verify_s: dict[int, _Ewma] = {}  # proposal size → verifier seconds
        self._depth: dict[int, _Ewma] = {}  # proposal size → tree depth (as the drafter reports it)
        self._delay: dict[int, _Ewma] = {}  # proposal size → drafting that delayed sending it
        self._drafter_reports_ahead = False  # a drafter that says what it drafted ahead (RoundTimings)
        self._sharing = _Ewma(1.0, weight)  # sessions per verifier pass
        self._verified_without_proposal = False
        self._largest_proposal = config.initial_budget
        self._rounds = 0
        self._rounds_since_proposal = 0
        self.budget = config.initial_budget

    @property
    def max_branches(self) -> int:
        return self.config.max_branches

    def initial(self) -> int:
        return self.budget

    def after_round(self, timings: RoundTimings) -> int | None:
        self._observe(timings)
        if self._draft_s_per_token.samples == 0:
            return None
        best = self.model().best_budget(self.config.max_budget, self.config.min_budget)
        if self.config.min_budget == 0 and not self._verified_without_proposal and self._rounds >= 2:
            best = 0  # measure the verifier alone once
        elif best == 0 and self._rounds_since_proposal >= self.config.probe_every:
            best = self.model().best_budget(self.config.max_budget, 1)  # keep the estimates fresh
        elif 0 < best < self.config.max_budget and self._rounds % self.config.probe_every == 0:
            best += 1  # now and then one depth deeper, so a pessimistic estimate there can recover
        # Grow at most to twice the largest proposal measured, plus one: the cost of sizes never tried is a
        # guess, and a verifier that batches makes a large one expensive (many sessions' large proposals).
        self.budget = min(best, 2 * self._largest_proposal + 1)
        return self.budget

    def _observe(self, timings: RoundTimings) -> None:
        self._rounds += 1
        self._rounds_since_proposal = 0 if timings.proposal_size else self._rounds_since_proposal + 1
        if timings.draft_tokens > 0:
            self._draft_s_per_token.update(timings.draft_compute_s / timings.draft_tokens)
        # The wait for a pass follows the other sessions' schedules, not this budget (below).
        self._network_s.update(max(0.0, timings.verify_round_trip_s - timings.verify_compute_s
                                   - timings.verify_queue_s))
        self._verified_without_proposal |= timings.proposal_size == 0
        self._largest_proposal = max(self._largest_proposal, timings.proposal_size)
        # A pass over t tokens costs what a session alone proposing t - 1 nodes would.
        size = timings.verify_batch_tokens - 1 if timings.verify_batch_tokens else timings.proposal_size
        self._sharing.update(timings.verify_batch_sessions or 1)
        estimate = self._verify_s.setdefault(size, _Ewma(timings.verify_compute_s, self.config.smoothing))
        estimate.update(timings.verify_compute_s)
        # A tree's deepest path bounds what can be accepted; a drafter that does not say treats it as a chain.
        depth = timings.proposal_depth or timings.proposal_size
        self._acceptance.observe(depth, timings.accepted_size)
        if timings.proposal_size > 0:
            self._depth.setdefault(timings.proposal_size, _Ewma(depth, self.config.smoothing)).update(depth)
        self._drafter_reports_ahead |= timings.draft_ahead_s > 0
        delay = max(0.0, timings.draft_compute_s - timings.draft_ahead_s)
        self._delay.setdefault(timings.proposal_size, _Ewma(delay, self.config.smoothing)).update(delay)

    def model(self) -> BudgetModel:
        return BudgetModel(
            draft_s_per_token=self._draft_s_per_token.value,
            verify_points=tuple(sorted((size, ewma.value) for size, ewma in self._verify_s.items())),
            network_s=self._network_s.value,
            acceptance=self._acceptance.rates(),
            depth_points=tuple(sorted((size, ewma.value) for size, ewma in self._depth.items())),
            delay_points=tuple(sorted((size, ewma.value) for size, ewma in self._delay.items()))
            if self._drafter_reports_ahead else (),
            sharing=self._sharing.value,
        )
