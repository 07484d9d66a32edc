"""What the speculative loop (``duo.draft_service.speculation``) asks of a drafter: duo's ``TreeDrafter``, or
any other that proposes token trees after a committed sequence."""

from __future__ import annotations

from typing import Protocol

from duo.common.tree import TokenTree


class Drafter(Protocol):
    compute_s: float  # seconds spent drafting so far; the loop reports each round's share
    tokens_drafted: int  # tokens the draft model has scored so far

    def prefill(self, prompt: list[int]) -> None:
        """Read the prompt ahead of the first round (beside the target's prefill)."""

    def commit(self, committed: list[int]) -> None:
        """Adopt the whole committed sequence (the prompt and every token committed since)."""

    def propose(self, max_nodes: int) -> TokenTree:
        """A tree of at most ``max_nodes`` nodes continuing the committed sequence."""

    def grow_ahead(self, target_nodes: int) -> bool:
        """Draft a little more while the verifier works; False once there is nothing more worth drafting."""
