"""How the draft would do as a greedy speculative drafter on the target's own (greedy) answers, scored from
one teacher-forced pass per answer instead of drafting and verifying round by round."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import takewhile

import torch
from transformers import LlamaForCausalLM

from duo.common.greedy_rounds import replay_greedy_rounds


def committed_per_round(matches: list[bool], budget: int) -> tuple[int, int]:
    """(tokens, rounds) of greedy chain speculation reproducing a sequence, from teacher-forced matches.

    ``matches[j]`` says whether the draft's argmax given the target's first ``j`` tokens is the target's token
    ``j``. While the draft agrees, its own greedy rollout *is* the target's prefix, so a round starting at
    ``p`` accepts the run of matches from ``p`` (at most ``budget``, and short enough that the target's own
    token still fits) and commits one more token: the target's.
    """
    def play_round(done: int, room: int) -> int:
        return len(list(takewhile(bool, matches[done:done + room])))

    return replay_greedy_rounds(len(matches), budget, play_round)


@torch.no_grad()
def validation_scores(draft: LlamaForCausalLM, records: list[dict], budgets: Sequence[int]) -> dict:
    """Agreement and mean committed tokens per round on the (greedy) validation answers."""
    matched = positions = 0
    tokens = {k: 0 for k in budgets}
    rounds = {k: 0 for k in budgets}
    for record in records:
        answer_start = record["prompt_len"]
        sequence = record["input_ids"].long()[None].to(draft.device)
        predicted = draft(input_ids=sequence).logits[0, answer_start - 1:-1].argmax(-1).cpu()
        matches = (predicted == record["input_ids"][answer_start:].long()).tolist()
        matched, positions = matched + sum(matches), positions + len(matches)
        for k in budgets:
            t, r = committed_per_round(matches, k)
            tokens[k], rounds[k] = tokens[k] + t, rounds[k] + r
    return {
        "validation_answers": len(records),
        "validation_tokens": positions,
        "agreement": matched / max(1, positions),
        "committed_per_round": {str(k): tokens[k] / max(1, rounds[k]) for k in budgets},
    }
