"""Exact stopping and incremental text for one generation.

Committed tokens are fed in one at a time; the first of max_new_tokens, an EOS token (kept, as HF
``generate`` keeps it) or a stop string (the tokens up to the one that completes it are committed; the text
is cut before it, and the generation's ``token_ids`` to the tokens of that text) ends the generation, and
nothing past that point is ever returned. Text deltas hold back whatever could still become a stop string
or is an incomplete UTF-8 character, so streamed text never has to be taken back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from duo.common.params import StoppingParams


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


@dataclass(frozen=True)
class CommitResult:
    token_ids: tuple[int, ...]  # the tokens committed from those offered (a stop string's own included)
    text_delta: str
    finish_reason: FinishReason | None


class StopChecker:
    """Tracks the generated tokens of one session. ``decode(ids) -> str`` skips special tokens."""

    def __init__(self, params: StoppingParams, eos_token_ids: frozenset[int], decode: Callable[[list[int]], str]):
        self._params = params
        self._eos = frozenset() if params.ignore_eos else eos_token_ids
        self._decode = decode
        self._holdback = max((len(stop) for stop in params.stop_strings), default=1) - 1
        self.token_ids: list[int] = []  # the generation's tokens: at a stop string, those of the text before it
        self.text = ""
        self._emitted_chars = 0
        self.finish_reason: FinishReason | None = None

    @property
    def remaining(self) -> int:
        """Tokens that may still be generated."""
        return 0 if self.finish_reason else self._params.max_new_tokens - len(self.token_ids)

    def add(self, token_ids: list[int] | tuple[int, ...]) -> CommitResult:
        """Offer newly committed tokens; returns those kept, the final text they add, and why it ended."""
        kept: list[int] = []
        for token in token_ids:
            if self.finish_reason is not None:
                break
            kept.append(token)
            self.token_ids.append(token)
            self.text = self._decode(self.token_ids)
            self.finish_reason = self._check_last_token(token)
        return CommitResult(tuple(kept), self._take_delta(), self.finish_reason)

    def _check_last_token(self, token: int) -> FinishReason | None:
        # The whole text is searched: decoding a new token can also change the characters before it.
        found = [index for index in (self.text.find(stop) for stop in self._params.stop_strings) if index != -1]
        if found:
            self.text = self.text[: min(found)]
            self._cut_tokens_to_text()
            return FinishReason.STOP
        if token in self._eos:
            return FinishReason.EOS
        if len(self.token_ids) >= self._params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _cut_tokens_to_text(self) -> None:
        """Drop the stop string's tokens: keep the longest run of tokens whose decoding the text starts with
        (all of the text, unless the stop string begins inside a token)."""
        while self.token_ids and not self.text.startswith(self._decode(self.token_ids)):
            self.token_ids.pop()

    def end(self, reason: FinishReason) -> str:
        """End the generation for a reason found outside (e.g. the context is full); returns the held-back text."""
        if self.finish_reason is None:
            self.finish_reason = reason
        return self._take_delta()

    def _take_delta(self) -> str:
        if self.finish_reason is not None:
            final_chars = len(self.text)
        else:
            final_chars = len(self.text) - self._holdback
            while final_chars > 0 and self.text[final_chars - 1] == "\ufffd":
                final_chars -= 1  # an incomplete UTF-8 sequence: wait for the rest
        if final_chars <= self._emitted_chars:
            return ""
        delta = self.text[self._emitted_chars:final_chars]
        self._emitted_chars = final_chars
        return delta
