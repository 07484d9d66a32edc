"""The latency-aware draft budget: choose the next proposal size to maximise committed tokens per second.

From the timings each round reports, the controller keeps running estimates of
  draft_s_per_token   drafter compute per drafted token
  verify_s(n)         verifier compute for a proposal of n nodes, measured per size
  network_s           round trip minus verifier compute (network, queues, serialisation)
  acceptance          per-token probability that the target accepts a draft token
and picks the budget k maximising

    expected committed tokens per round   1 + a + a^2 + ... + a^k           (a = acceptance)
    ─────────────────────────────────── = ────────────────────────────────────────────────────
    expected seconds per round            hit * max(T_draft(k), RTT + T_verify(k))
                                          + (1 - hit) * (T_draft(k) + RTT + T_verify(k))

over k = 0 (no speculation) .. max, with T_verify measured per proposal size (not assumed linear)

where hit = a^(k+1) is the chance that the whole proposal and the drafter's guess of the target's next
token are accepted — then the next proposal was drafted during verification and the round costs only the
slower of the two sides (drafting and verification overlap, DuoDecoding's T_draft ≈ RTT + T_verify
balance); otherwise the drafter starts over after the verdict. Pure: numbers in, a budget out.
"""

from __future__ import annotations

from dataclasses import dataclass

from duo_common.events import RoundTimings


@dataclass(frozen=True)
class BudgetModel:
    """A snapshot of the estimates; ``best_budget`` and ``tokens_per_s`` are pure functions of it."""

    draft_s_per_token: float
    verify_points: tuple[tuple[int, float], ...]  # (proposal size, verifier seconds), sizes ascending
    network_s: float
    acceptance: float

    def verify_s(self, nodes: int) -> float:
        """Verifier compute for a proposal of ``nodes``: measured, else linearly inter-/extrapolated.

        Measured, not assumed linear: on a CPU the cost of a forward jumps from 1 to 2 tokens and then
        flattens (matrix kernels change with the row count)."""
        points = self.verify_points
        if not points:
            return 0.0
        for size, seconds in points:
            if size == nodes:
                return seconds
        if len(points) == 1:
            return points[0][1]
        below = [p for p in points if p[0] < nodes]
        above = [p for p in points if p[0] > nodes]
        (x0, y0), (x1, y1) = (below[-1], above[0]) if below and above else (points[-2:] if below else points[:2])
        return max(0.0, y0 + (y1 - y0) * (nodes - x0) / (x1 - x0))

    def expected_committed(self, budget: int) -> float:
        a = min(max(self.acceptance, 0.0), 0.999)
        return sum(a**i for i in range(budget + 1))

    def round_s(self, budget: int) -> float:
        draft_s = self.draft_s_per_token * budget
        verify_s = self.network_s + self.verify_s(budget)
        hit = min(max(self.acceptance, 0.0), 1.0) ** (budget + 1)
        return hit * max(draft_s, verify_s) + (1 - hit) * (draft_s + verify_s)

    def tokens_per_s(self, budget: int) -> float:
        return self.expected_committed(budget) / max(self.round_s(budget), 1e-9)

    def best_budget(self, max_budget: int, min_budget: int = 0) -> int:
        return max(range(min_budget, max_budget + 1), key=lambda k: (self.tokens_per_s(k), -k))


class _Ewma:
    def __init__(self, initial: float, weight: float):
        self.value, self._weight, self.samples = initial, weight, 0

    def update(self, sample: float) -> None:
        # The first samples count fully, so the prior fades fast; then exponential forgetting.
        weight = max(self._weight, 1.0 / (self.samples + 2))
        self.value += weight * (sample - self.value)
        self.samples += 1


@dataclass(frozen=True)
class ControllerConfig:
    initial_budget: int = 4
    max_budget: int = 16
    min_budget: int = 0  # 0 lets the controller switch speculation off where it does not pay
    smoothing: float = 0.2  # weight of the newest round in every running estimate
    prior_acceptance: float = 0.6
    probe_every: int = 16  # rounds between probes of an unmeasured or abandoned option
    max_branches: int = 1  # tree width sent with every budget (1: chains); the model above assumes chains


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
        # Per-token acceptance as successes / trials: a proposal of k with a accepted tried a + [a < k] tokens.
        self._accepted = _Ewma(config.prior_acceptance, weight)
        self._tried = _Ewma(1.0, weight)
        self._verify_s: dict[int, _Ewma] = {}  # proposal size → verifier seconds
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
        if self.config.min_budget == 0 and 0 not in self._verify_s and self._rounds >= 2:
            best = 0  # measure the verifier alone once
        elif best == 0 and self._rounds_since_proposal >= self.config.probe_every:
            best = self.model().best_budget(self.config.max_budget, 1)  # keep the estimates fresh
        self.budget = best
        return self.budget

    def _observe(self, timings: RoundTimings) -> None:
        self._rounds += 1
        self._rounds_since_proposal = 0 if timings.proposal_size else self._rounds_since_proposal + 1
        if timings.draft_tokens > 0:
            self._draft_s_per_token.update(timings.draft_compute_s / timings.draft_tokens)
        self._network_s.update(max(0.0, timings.verify_round_trip_s - timings.verify_compute_s))
        estimate = self._verify_s.setdefault(timings.proposal_size, _Ewma(timings.verify_compute_s, self.config.smoothing))
        estimate.update(timings.verify_compute_s)
        if timings.proposal_size > 0:
            rejected = 1 if timings.accepted_size < timings.proposal_size else 0
            self._accepted.update(timings.accepted_size)
            self._tried.update(timings.accepted_size + rejected)

    def model(self) -> BudgetModel:
        return BudgetModel(
            draft_s_per_token=self._draft_s_per_token.value,
            verify_points=tuple(sorted((size, ewma.value) for size, ewma in self._verify_s.items())),
            network_s=self._network_s.value,
            acceptance=self._accepted.value / self._tried.value if self._tried.value > 0 else 0.0,
        )
