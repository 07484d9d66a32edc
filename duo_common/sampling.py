"""The one logits → probabilities transform, and the random draws built on it.

Draft and target both call ``logits_to_probs``, so the distributions that speculative sampling compares are
computed identically (a mismatch here silently breaks losslessness).

A seeded session draws each token by an exponential race with noise that is a function of the seed and the
token's position only (``race_noise``): the token at a position is fixed by the seed and the target's
distribution there, whatever was drafted, however the rounds fell and whichever verifier session computed
it. The drafter runs the same race on its own distribution, so it proposes the target's token whenever the
two distributions agree on the winner."""

from __future__ import annotations

import hashlib

import torch

from duo.common.params import DecodingParams


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


def derived_seed(seed: int | None, role: str) -> int | None:
    """A seed for one role of a session (e.g. the drafter), unrelated to ``seed`` itself and to other roles:
    the verifier uses the request's seed as is, the drafter ``derived_seed(seed, "draft")``, so their random
    streams never coincide, nor does one session's drafter replay another session's verifier."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"duo:{role}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def race_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """Exponential(1) noise [vocab_size] for the token at ``position`` (its index in prompt + output) of a
    session seeded with ``seed``: the same numbers in the drafter and in every verifier session."""
    key = hashlib.sha256(f"duo:race:{seed}:{position}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return -torch.log(torch.rand(vocab_size, generator=generator))


def race_noise_rows(seed: int, first_position: int, rows: int, vocab_size: int) -> torch.Tensor:
    """``race_noise`` of ``rows`` consecutive positions from ``first_position``: [rows, vocab_size]."""
    return torch.stack([race_noise(seed, first_position + row, vocab_size) for row in range(rows)])


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race over the last dimension: argmax of probs / noise, which is a draw from ``probs``
    when the noise is iid Exponential(1) (token x finishes first with probability probs[x]). Ties, and a
    zero noise (probability 2**-24 per entry), resolve deterministically."""
    return (probs / noise).argmax(dim=-1)


def without_tokens(probs: torch.Tensor, tokens: list[int]) -> torch.Tensor | None:
    """probs [vocab] with ``tokens`` zeroed and renormalised (sampling siblings without replacement);
    None when no probability is left."""
    if not tokens:
        return probs
    rest = probs.clone()
    rest[tokens] = 0.0
    total = rest.sum()
    return rest / total if total > 0 else None


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from probs [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator).item())
