"""Several sequences' new tokens through the model in one forward pass, each over its own KV cache.

A verify service with many sessions scores their waiting proposals (and prefill chunks) together: the
weights are read once for all of them. On the packed CPU runtime's lean Llama forward the sequences share
one pass (``lean_llama.forward_sequences``: products over all rows, attention per sequence), and each
sequence's logits are bit for bit those of a pass over it alone; any other model runs one pass per
sequence, which computes the same numbers without the saving.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from duo.common import lean_llama
from duo.common.kv_cache import cache_argument
from duo.common.tree_attention import attention_inputs


@dataclass(frozen=True)
class NewTokens:
    """One sequence's tokens for a pass: placed after the ``cache``'s positions (which they join), at
    ``positions`` (default: the next ones in order) and seeing ``visible`` [n, cached + n] (default: causal);
    ``kept_logits`` says how many of the last rows' logits are wanted."""

    token_ids: tuple[int, ...]
    cache: DynamicCache
    positions: tuple[int, ...] | None = None
    visible: torch.Tensor | None = None
    kept_logits: int = 0

    def position_ids(self, past: int) -> torch.Tensor:
        if self.positions is None:
            return torch.arange(past, past + len(self.token_ids))
        return torch.tensor(self.positions, dtype=torch.long)


def runs_together(model: torch.nn.Module) -> bool:
    """Whether sequences share one pass on this model (else ``forward`` runs one pass per sequence)."""
    return lean_llama.runs_sequences_together(model)


def forward(model: torch.nn.Module, sequences: list[NewTokens], fits_together: int) -> list[torch.Tensor]:
    """Each sequence's kept logits [kept_logits, vocab] (float32, CPU), after its tokens joined its cache.
    Sequences of at most ``fits_together`` tokens share a pass where the model can; the others run alone."""
    shared = [s for s in sequences if len(s.token_ids) <= fits_together] if runs_together(model) else []
    results = dict(zip(map(id, shared), lean_llama.forward_sequences(model, shared))) if shared else {}
    return [results[id(s)] if id(s) in results else _forward_alone(model, s) for s in sequences]


@torch.inference_mode()
def _forward_alone(model: torch.nn.Module, sequence: NewTokens) -> torch.Tensor:
    device = next(model.parameters()).device
    past = sequence.cache.get_seq_length()
    kwargs = {}
    if sequence.visible is not None:
        kwargs = attention_inputs(sequence.visible, sequence.position_ids(past), model.dtype, device)
    elif sequence.positions is not None:
        kwargs = {"position_ids": sequence.position_ids(past)[None].to(device)}
    input_ids = torch.tensor([sequence.token_ids], dtype=torch.long, device=device)
    kept = max(sequence.kept_logits, 1)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:  # models that can skip the others
        kwargs["logits_to_keep"] = kept
    logits = model(input_ids=input_ids, use_cache=True, **cache_argument(model, sequence.cache), **kwargs).logits[0]
    return logits[len(logits) - sequence.kept_logits:].float().cpu()
