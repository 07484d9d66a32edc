"""How hard a generation tries to carry on after losing a peer: the draft service after losing its verifier
(a new verifier session on the prompt plus every committed token), the client after losing its draft service
(the same request, continued from the tokens it has received)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResumePolicy:
    """At most ``attempts`` new sessions, none started later than ``within_s`` after the loss, with pauses
    doubling from ``first_pause_s`` up to ``max_pause_s`` (a restarting peer, or a channel reconnecting,
    needs a moment)."""

    attempts: int = 5
    within_s: float = 60.0
    first_pause_s: float = 0.5
    max_pause_s: float = 8.0

    def pause_s(self, attempt: int, left_s: float) -> float:
        """The pause before ``attempt`` (1, 2, ...), never past the time left."""
        return max(0.0, min(self.first_pause_s * 2 ** (attempt - 1), self.max_pause_s, left_s))
