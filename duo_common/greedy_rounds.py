"""Greedy speculative decoding replayed against a continuation the target is known to produce, without the
target: greedy verification keeps the longest proposed path that matches the continuation and adds the
target's own next token, so the rounds a drafter would take are exact. The draft benchmark
(benchmarks/draft_quality.py) and the distillation recipe's validation score count tokens per round this way.
"""

from __future__ import annotations

from typing import Callable


def replay_greedy_rounds(length: int, budget: int, play_round: Callable[[int, int], int]) -> tuple[int, int]:
    """(tokens committed, rounds) of greedy speculative decoding that reproduces a continuation of ``length``
    tokens with proposals of at most ``budget`` tokens.

    A round starts after ``done`` committed tokens and may propose ``room`` tokens: the budget, cut so that
    the target's own token still fits. ``play_round(done, room)`` drafts that round and says how many of its
    proposed tokens match the continuation from ``done`` on; the round commits them and the target's token.
    """
    done = rounds = 0
    while done < length:
        room = min(budget, length - done - 1)
        done += play_round(done, room) + 1
        rounds += 1
    return done, rounds
