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

import threading
from dataclasses import dataclass

from duo.common.events import RoundTimings


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


MAX_BUDGET_FLAG = 1024  # largest draft budget a command line takes (the verifier's tree limit applies too)


def parse_budget(value: str) -> int | None:
    """A command line's draft budget: ``auto`` → None (the latency-aware controller), else a number of draft
    tokens in [0, MAX_BUDGET_FLAG]; ValueError otherwise."""
    if value == "auto":
        return None
    try:
        budget = int(value)
    except ValueError:
        raise ValueError(f"expected a number of draft tokens or 'auto', got {value!r}") from None
    if not 0 <= budget <= MAX_BUDGET_FLAG:
        raise ValueError(f"draft budget must be in [0, {MAX_BUDGET_FLAG}], got {budget}")
    return budget


def _interpolated(points: tuple[tuple[int, float], ...], size: int) -> float:
    """The value at ``size`` of (size, value) points sorted by size: measured, else linearly inter- or
    extrapolated from the nearest two; never negative.

    From one point, the value scales with the tokens (size + 1): the first round's cost alone says nothing
    of how cost grows, and assuming it does not grow made every larger proposal look free (a session's
    second round then proposed the largest size allowed, 9 tokens for a pass that costs 3 times one)."""
    if not points:
        return 0.0
    for at, value in points:
        if at == size:
            return value
    if len(points) == 1:
        at, value = points[0]
        return value * (size + 1) / (at + 1)
    below = [p for p in points if p[0] < size]
    above = [p for p in points if p[0] > size]
    (x0, y0), (x1, y1) = (below[-1], above[0]) if below and above else (points[-2:] if below else points[:2])
    return max(0.0, y0 + (y1 - y0) * (size - x0) / (x1 - x0))


class _Ewma:
    def __init__(self, initial: float, weight: float, samples: int = 0):
        self.value, self._weight, self.samples = initial, weight, samples

    @classmethod
    def warm(cls, value: float, weight: float) -> "_Ewma":
        """Starting from an earlier estimate: new samples move it at the steady weight, not all the way."""
        return cls(value, weight, samples=round(1.0 / weight))

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

    def __init__(self, prior: float, max_depth: int, memory: float, shrinkage: float = 4.0,
                 priors: tuple[float, ...] = ()):
        self.prior, self.shrinkage = prior, shrinkage
        # per-depth priors (an earlier session's rates): depth d shrinks toward its own, not its neighbour's
        self._priors = priors
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
        for depth, (successes, trials) in enumerate(zip(self._successes, self._trials)):
            toward = self._priors[min(depth, len(self._priors) - 1)] if self._priors else shallower
            shallower = (successes + self.shrinkage * toward) / (trials + self.shrinkage)
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
    max_probe_every: int = 256  # while probes keep finding that speculation does not pay, they space out to this
    acceptance_memory: float = 48.0  # trials at a depth over which its acceptance is averaged
    max_branches: int = 1  # tree width sent with every budget (1: chains)


class SharedEstimates:
    """What the sessions on one verifier have learnt, for the next session to start from.

    The costs (drafting, verifying each size, the link, how many sessions share a pass) belong to the
    hardware and the load, not to a session; acceptance depends on the text but the last session's is a
    better start than a fixed prior. A session that starts cold spends its first rounds on sizes it has no
    cost for and on measuring the verifier alone: on the default pair on 2 cores, about a quarter of a
    second per session. Thread-safe: the sessions of a service share one."""

    def __init__(self):
        self._lock = threading.Lock()
        self._model: BudgetModel | None = None

    def remember(self, model: BudgetModel | None) -> None:
        with self._lock:
            self._model = model

    def recall(self) -> BudgetModel | None:
        with self._lock:
            return self._model

    def forget(self) -> None:
        """The verifier changed (a new connection may reach another replica or model): start cold."""
        self.remember(None)


class AdaptiveBudget:
    """A BudgetPolicy for the orchestrator: re-estimates after every round, adapts when latency changes.

    It explores a little: once early on it verifies one round without a proposal (to measure what the
    verifier costs alone), and while speculation is off it proposes again after ``probe_every`` rounds, so
    its estimates of drafting and acceptance stay current (and after twice as many each time a probe leaves
    speculation off, up to ``max_probe_every``). Given ``shared`` estimates, it starts from what
    earlier sessions measured (their best budget first) and leaves its own there after every round."""

    def __init__(self, config: ControllerConfig = ControllerConfig(), shared: SharedEstimates | None = None):
        self.config = config
        self._shared = shared
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
        self._rounds_since_speculating = 0  # rounds since the model last chose a budget above 0
        self._probe_interval = config.probe_every
        self.budget = config.initial_budget
        earlier = shared.recall() if shared is not None else None
        if earlier is not None:
            self._start_from(earlier)

    def _start_from(self, earlier: BudgetModel) -> None:
        """Every estimate from ``earlier``; the verifier alone is still measured once, in case its cost moved
        while the earlier sessions were speculating (it is the option every budget is weighed against)."""
        config, weight = self.config, self.config.smoothing
        self._draft_s_per_token = _Ewma.warm(earlier.draft_s_per_token, weight)
        self._network_s = _Ewma.warm(earlier.network_s, weight)
        self._acceptance = DepthAcceptance(config.prior_acceptance, config.max_budget + 1, config.acceptance_memory,
                                           priors=earlier.acceptance)
        self._verify_s = {size: _Ewma.warm(value, weight) for size, value in earlier.verify_points}
        self._depth = {size: _Ewma.warm(value, weight) for size, value in earlier.depth_points}
        self._delay = {size: _Ewma.warm(value, weight) for size, value in earlier.delay_points}
        self._drafter_reports_ahead = bool(earlier.delay_points)
        self._sharing = _Ewma.warm(earlier.sharing, weight)
        self._largest_proposal = max([size for size, _ in earlier.depth_points] + [config.initial_budget])
        self.budget = earlier.best_budget(config.max_budget, config.min_budget)

    @property
    def max_branches(self) -> int:
        return self.config.max_branches

    def initial(self) -> int:
        return self.budget

    def after_round(self, timings: RoundTimings) -> int | None:
        self._observe(timings)
        if self._shared is not None:
            self._shared.remember(self.model())
        if self._draft_s_per_token.samples == 0:
            return None
        best = self.model().best_budget(self.config.max_budget, self.config.min_budget)
        if timings.proposal_size > 0 and self._rounds_since_speculating > 0:  # a probe's verdict
            # Each probe that leaves speculation off doubles the wait for the next one: a probe costs a
            # round's drafting and draft rows that speculation, off for good reason, does not repay.
            self._probe_interval = (min(2 * self._probe_interval, self.config.max_probe_every) if best == 0
                                    else self.config.probe_every)
        self._rounds_since_speculating = 0 if best > 0 else self._rounds_since_speculating + 1
        if self.config.min_budget == 0 and not self._verified_without_proposal and self._rounds >= 2:
            best = 0  # measure the verifier alone once
        elif best == 0 and self._rounds_since_proposal >= self._probe_interval:
            best = self.model().best_budget(self.config.max_budget, 1)  # keep the estimates fresh
        elif 0 < best < self.config.max_budget and self._rounds % self.config.probe_every == 0:
            best += 1  # now and then one depth deeper, so a pessimistic estimate there can recover
        # Grow one size past the largest proposal measured at a time: the cost of sizes never tried is
        # extrapolated, and two noisy neighbouring sizes can make every larger size look nearly free.
        self.budget = min(best, self._largest_proposal + 1)
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
