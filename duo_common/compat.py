"""Whether a draft model can speculate for a target model: the same tokenizer, token for token."""

from __future__ import annotations

from duo.common.errors import FailedPrecondition
from duo.common.models import ModelInfo


def check_compatible(draft: ModelInfo, target: ModelInfo) -> None:
    """Raise FailedPrecondition, naming both models, unless the draft's token ids mean the target's."""
    problems = []
    if draft.tokenizer_fingerprint != target.tokenizer_fingerprint:
        problems.append("their tokenizers differ (different vocabulary or special tokens)")
    if draft.vocab_size > target.vocab_size:
        problems.append(f"the draft's vocabulary ({draft.vocab_size}) is larger than the target's ({target.vocab_size})")
    if problems:
        raise FailedPrecondition(
            f"draft model {draft.model_name!r} cannot speculate for target {target.model_name!r}: "
            + "; ".join(problems)
            + ". Pick a draft model that shares the target's tokenizer."
        )
