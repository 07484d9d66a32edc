"""Context copying: the token that followed the last earlier occurrence of the current suffix.

Chat answers repeat themselves and their prompt (names, code identifiers, list scaffolding, a question's
wording), and a small draft often misses a repeat that an n-gram lookup finds (prompt-lookup decoding).
``ContextCopy`` watches the committed sequence: it indexes every n-gram (``MIN_MATCH`` to ``MAX_MATCH``
tokens) by the token that followed its latest occurrence, and measures, for each match length, how often
the target's next token was that copy. ``suggest`` finds the longest match for a context (the committed
sequence plus a draft path) and ``mix`` raises the copy's probability in the draft's distribution to that
measured hit rate, scaling the other tokens down so it still sums to one.

The mixed distribution is an ordinary draft distribution: greedy drafting ranks by it, sampled drafting
draws from it and sends it to the verifier, so losslessness is untouched. No model calls, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_MATCH = 2  # a one-token match is a unigram guess, not a copy
MAX_MATCH = 8


@dataclass(frozen=True)
class Copy:
    token: int
    match: int  # the length of the matched suffix, MIN_MATCH..MAX_MATCH
    rate: float  # measured P(the target's next token is ``token``) for matches of this length


class ContextCopy:
    """Copy suggestions for contexts that extend the committed sequence, with hit rates per match length
    learned from the committed sequence itself (a Beta prior of ``weight`` pseudo-observations at
    ``prior_rate``)."""

    def __init__(self, prior_rate: float = 0.5, weight: float = 4.0):
        self._tokens: list[int] = []
        self._follower: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after its latest occurrence
        self._hits = [prior_rate * weight] * (MAX_MATCH + 1)
        self._tries = [weight] * (MAX_MATCH + 1)

    def observe(self, committed: list[int]) -> None:
        """Adopt the committed sequence: score the copy suggested before each new token, then index it.
        A sequence that does not extend the one seen is indexed afresh (the rates are kept)."""
        if committed[: len(self._tokens)] != self._tokens:
            self._tokens, self._follower = [], {}
        for token in committed[len(self._tokens):]:
            suggestion = self._lookup(self._tokens, ())
            if suggestion is not None:
                self._tries[suggestion.match] += 1.0
                self._hits[suggestion.match] += float(suggestion.token == token)
            self._tokens.append(token)
            self._index_last()

    def suggest(self, path: tuple[int, ...] = ()) -> Copy | None:
        """The copy for the committed sequence followed by ``path`` (draft tokens), if any suffix recurs."""
        return self._lookup(self._tokens, path)

    def rate(self, match: int) -> float:
        return self._hits[match] / self._tries[match]

    def mix(self, probs: torch.Tensor, copy: Copy | None) -> torch.Tensor:
        """probs [vocab] with the copy's probability raised to its hit rate (unchanged if already higher)."""
        if copy is None or copy.token >= probs.shape[-1]:
            return probs
        current = float(probs[copy.token])
        if current >= copy.rate:
            return probs
        mixed = probs * ((1.0 - copy.rate) / (1.0 - current))  # current < rate <= 1
        mixed[copy.token] = copy.rate
        return mixed

    def _index_last(self) -> None:
        """Index the n-grams that end just before the newest token, by that token's position."""
        tokens, end = self._tokens, len(self._tokens) - 1
        for length in range(MIN_MATCH, min(MAX_MATCH, end) + 1):
            self._follower[tuple(tokens[end - length:end])] = end

    def _lookup(self, tokens: list[int], path: tuple[int, ...]) -> Copy | None:
        for length in range(min(MAX_MATCH, len(tokens) + len(path)), MIN_MATCH - 1, -1):
            from_path = min(length, len(path))
            suffix = tuple(tokens[len(tokens) - (length - from_path):]) if length > from_path else ()
            position = self._follower.get(suffix + path[len(path) - from_path:])
            if position is not None:
                return Copy(tokens[position], length, self.rate(length))
        return None
