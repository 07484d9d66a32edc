"""A session's draft budget and who chooses it: the request (fixed), the client (Session budget updates
between rounds), or, for a request that sets none, this service's latency-aware controller
(``duo.common.budget``, the same one ``duo-client --draft-budget auto`` runs), fed by the session's rounds.

The speculation loop only reads the budget (``budget()``, ``budget.max_branches()``) before each proposal.
"""

from __future__ import annotations

import threading

from duo.draft_service.draft_tree import MAX_WIDTH
from duo.common.budget import AdaptiveBudget
from duo.common.errors import InvalidArgument
from duo.common.events import BudgetSource, RoundTimings


class SessionBudget:
    """The current draft budget (tokens, and tree width) of one session."""

    def __init__(self, initial: int, limit: int, max_branches: int = 1, controller: AdaptiveBudget | None = None):
        self._limit = limit
        self._controller = controller
        self._value = self._checked(controller.initial() if controller else initial)
        self._branches = _checked_branches(max_branches)
        self._lock = threading.Lock()
        self.source = BudgetSource.SERVICE if controller else BudgetSource.REQUEST

    def __call__(self) -> int:
        with self._lock:
            return self._value

    def max_branches(self) -> int:
        with self._lock:
            return self._branches

    def from_client(self, value: int, max_branches: int | None = None) -> None:
        """The client's new budget; from now on the client steers (the service's controller stops)."""
        checked = self._checked(value)
        branches = self._branches if max_branches is None else _checked_branches(max_branches)
        with self._lock:
            self._value, self._branches = checked, branches
            self._controller, self.source = None, BudgetSource.CLIENT

    def after_round(self, timings: RoundTimings) -> None:
        """A round's timings, for the service's controller when it steers this session."""
        with self._lock:
            controller = self._controller
        chosen = controller.after_round(timings) if controller else None
        if chosen is None:
            return
        with self._lock:
            if self._controller is controller:  # the client has not taken over meanwhile
                self._value = min(chosen, self._limit)

    def _checked(self, value: int) -> int:
        if not 0 <= value <= self._limit:
            raise InvalidArgument(f"draft budget {value} is outside [0, {self._limit}] (the verifier's tree limit)")
        return value


def _checked_branches(value: int) -> int:
    """max_branches 0 and 1 both mean chains."""
    if not 0 <= value <= MAX_WIDTH:
        raise InvalidArgument(f"max_branches {value} is outside [0, {MAX_WIDTH}]")
    return max(value, 1)
