"""The draft model's side of one session: chains that continue the committed sequence.

The drafter keeps a *belief*: the committed tokens followed by the tokens it has drafted beyond them.
Its KV cache holds a prefix of that belief (``fed``). When the verifier commits tokens, the belief keeps
whatever drafted continuation still agrees with them, so tokens drafted ahead while the previous proposal
was being verified are reused; otherwise the cache is cropped to the common prefix (never re-prefilled)
and drafting resumes from the committed tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from duo_common.models import truncate_cache
from duo_common.params import DecodingParams
from duo_common.sampling import logits_to_probs, make_generator, sample


@dataclass(frozen=True)
class DraftChain:
    token_ids: tuple[int, ...]
    draft_probs: torch.Tensor | None  # [len, target_vocab] for sampled decoding, else None


class ChainDrafter:
    def __init__(
        self,
        model: torch.nn.Module,
        params: DecodingParams,
        target_vocab_size: int,
        stop_token_ids: frozenset[int],
        max_tokens: int,
    ):
        self._model = model
        self._device = next(model.parameters()).device
        self._params = params
        self._generator = make_generator(None if params.seed is None else params.seed + 1)
        self._target_vocab_size = target_vocab_size
        self._stop_token_ids = stop_token_ids  # drafting past these is wasted work
        self._max_tokens = max_tokens  # longest sequence the drafter may build (context limit)
        self._cache = DynamicCache(config=model.config)
        self._fed: list[int] = []
        self._next_logits: torch.Tensor | None = None  # logits after the last fed token
        self._committed_len = 0
        self._belief: list[int] = []
        self._belief_probs: list[torch.Tensor | None] = []  # per drafted token (index from committed_len)
        self.compute_s = 0.0
        self.tokens_drafted = 0

    @property
    def drafted_ahead(self) -> int:
        """Tokens drafted beyond the committed sequence."""
        return len(self._belief) - self._committed_len

    def commit(self, committed: list[int]) -> None:
        """Adopt the committed sequence, keeping drafted tokens that still agree with it."""
        agrees = len(self._belief) >= len(committed) and self._belief[: len(committed)] == committed
        if agrees:
            self._belief_probs = self._belief_probs[len(committed) - self._committed_len:]
        else:
            self._belief = list(committed)
            self._belief_probs = []
        self._committed_len = len(committed)
        common = _common_prefix(self._fed, self._belief)
        if common < len(self._fed):
            started = time.perf_counter()
            truncate_cache(self._cache, common)
            del self._fed[common:]
            self._next_logits = None
            self.compute_s += time.perf_counter() - started

    def prefill(self, prompt: list[int]) -> None:
        """Feed the prompt ahead of time (overlapping the target's prefill)."""
        self.commit(list(prompt))
        started = time.perf_counter()
        self._feed(list(prompt))
        self.compute_s += time.perf_counter() - started

    def can_extend(self) -> bool:
        last = self._belief[-1] if self.drafted_ahead else None
        return last not in self._stop_token_ids and len(self._belief) < self._max_tokens

    def extend(self) -> None:
        """Draft one more token at the end of the belief."""
        started = time.perf_counter()
        self._feed(self._belief[len(self._fed):])
        assert self._next_logits is not None, "the belief must extend past the cropped cache"
        logits = self._next_logits[: self._target_vocab_size]
        if self._params.is_greedy:
            token, probs = int(logits.argmax()), None
        else:
            probs = logits_to_probs(logits, self._params)
            token = sample(probs, self._generator)
        self._belief.append(token)
        self._belief_probs.append(probs)
        self.tokens_drafted += 1
        self.compute_s += time.perf_counter() - started

    def propose(self, max_tokens: int) -> DraftChain:
        """Up to ``max_tokens`` drafted tokens after the committed sequence (fewer after a stop token)."""
        while self.drafted_ahead < max_tokens and self.can_extend():
            self.extend()
        tokens = self._belief[self._committed_len:][:max_tokens]
        for index, token in enumerate(tokens):
            if token in self._stop_token_ids:
                tokens = tokens[: index + 1]
                break
        probs = None
        if not self._params.is_greedy and tokens:
            probs = torch.stack(self._belief_probs[: len(tokens)])
        return DraftChain(tuple(tokens), probs)

    def _feed(self, tokens: list[int]) -> None:
        if not tokens:
            return
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self._device)
        with torch.inference_mode():
            output = self._model(input_ids=input_ids, past_key_values=self._cache, use_cache=True)
        self._fed.extend(tokens)
        self._next_logits = _pad_vocab(output.logits[0, -1].float().cpu(), self._target_vocab_size)


def _pad_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Give draft logits the target's vocabulary size (padding ids the draft cannot produce)."""
    if logits.shape[-1] >= vocab_size:
        return logits
    return torch.cat([logits, logits.new_full((vocab_size - logits.shape[-1],), float("-inf"))])


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = min(len(a), len(b))
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length
