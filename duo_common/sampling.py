"""The one logits → probabilities transform. Draft and target both call it, so the distributions that
speculative sampling compares are computed identically (a mismatch here silently breaks losslessness)."""

from __future__ import annotations

import torch

from duo_common.params import DecodingParams


def logits_to_probs(logits: torch.Tensor, params: DecodingParams) -> torch.Tensor:
    """Turn logits [..., vocab] into float32 probabilities [..., vocab].

    Greedy gives a one-hot at the argmax (ties to the lowest id, like ``torch.argmax``); otherwise
    temperature, then top-k, then top-p (nucleus, keeping the smallest prefix reaching ``top_p``).
    """
    logits = logits.float()
    if params.is_greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth_largest = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def make_generator(seed: int | None) -> torch.Generator:
    """A private generator per session: seeded when asked, else from fresh OS entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from probs [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator).item())
