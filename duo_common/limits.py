"""Token ids and prompt lengths checked against a model's limits, in one wording for every service: a caller
refused by the draft service reads what the verify service would have said."""

from __future__ import annotations

from collections.abc import Iterable

from duo.common.errors import InvalidArgument


def checked_token_ids(ids: Iterable[int], vocab_size: int, what: str) -> tuple[int, ...]:
    """``ids`` as a tuple of ints, each within [0, vocab_size); ``what`` names them in the refusal."""
    ids = tuple(int(i) for i in ids)
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise InvalidArgument(f"{what}: token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def check_prompt_fits(prompt_tokens: int, max_context_tokens: int) -> None:
    """A prompt must leave room in the target's context for at least one new token."""
    if prompt_tokens >= max_context_tokens:
        raise InvalidArgument(f"the prompt has {prompt_tokens} tokens; the target's context holds "
                              f"{max_context_tokens} including at least one new token")
