"""The verification rule: which proposed nodes the target accepts, and the target's own next token.

Glossary
  accepted     proposed nodes kept, a root-to-leaf path in the tree
  correction   the target's token at the first rejection, sampled from the residual distribution
  bonus        the target's token after a fully accepted path, sampled from its own distribution
  next token   the correction or the bonus: every round commits accepted + 1 tokens

Greedy walks the tree along the target's argmax: exact by construction. Sampling applies, at each node,
multi-draft speculative sampling (SpecInfer's multi-step rule; Sequoia's without-replacement variant when
each child carries the distribution it was sampled from given its earlier siblings): try the children in
order, accept child x with probability min(1, target(x) / draft(x)); after a rejection replace the target
distribution by the normalised residual max(0, target - draft). The committed token then has exactly the
target's distribution. Randomness comes from a ``Draws`` object (the session's torch.Generator in
production; an exhaustive enumerator in the exact tests).

Seeded sampling fixes the target's token at every position before looking at the tree: the exponential race
of the target's distribution against the noise of that position (``sampling.race_noise``), then walks the
tree along those tokens as greedy does. Each token has exactly the target's distribution (the race draws
from it, with noise no earlier position saw), and the output is the target's own for that seed, whatever was
drafted: a resumed session, a different budget or another drafter reproduce it token for token.

Pure functions: tensors in, a dataclass out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from duo.common.sampling import race
from duo.common.tree import ROOT, TokenTree, child_with_token


@dataclass(frozen=True)
class Acceptance:
    accepted_nodes: tuple[int, ...]  # a root-to-leaf path of node indices
    next_token: int  # correction or bonus


class Draws(Protocol):
    """The two kinds of random choice the rule makes."""

    def bernoulli(self, probability: float) -> bool: ...
    def categorical(self, probs: torch.Tensor) -> int: ...


@dataclass(frozen=True)
class TorchDraws:
    """Draws from a session's private generator."""

    generator: torch.Generator

    def bernoulli(self, probability: float) -> bool:
        return torch.rand((), generator=self.generator).item() < probability

    def categorical(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def accept_greedy(tree: TokenTree, target_logits: torch.Tensor) -> Acceptance:
    """Follow the target's argmax through the tree. target_logits: [num_nodes + 1, vocab], row 0 = root."""
    assert target_logits.shape[0] == len(tree) + 1, (target_logits.shape, len(tree))
    return _follow(tree, target_logits.argmax(dim=-1).tolist())


def accept_seeded(tree: TokenTree, target_probs: torch.Tensor, noise: torch.Tensor) -> Acceptance:
    """Follow the target's seeded draws through the tree. target_probs: [num_nodes + 1, vocab], row 0 = root;
    noise: [tree depth + 1, vocab], row d = the noise of the position d tokens after the root's."""
    assert target_probs.shape[0] == len(tree) + 1, (target_probs.shape, len(tree))
    depths = torch.tensor([0, *tree.depths()])
    return _follow(tree, race(target_probs, noise[depths]).tolist())


def _follow(tree: TokenTree, target_tokens: list[int]) -> Acceptance:
    """Accept the path along the target's token at each node (row 0 = root) as far as the tree has it."""
    accepted: list[int] = []
    node = ROOT
    while True:
        wanted = target_tokens[node + 1]
        match = child_with_token(tree, node, wanted)
        if match is None:
            return Acceptance(tuple(accepted), wanted)
        accepted.append(match)
        node = match


def accept_sampled(
    tree: TokenTree,
    target_probs: torch.Tensor,  # [num_nodes + 1, vocab], row 0 = root
    randomness: torch.Generator | Draws,
) -> Acceptance:
    """Multi-draft speculative sampling down the tree; the output has exactly the target's distribution."""
    assert target_probs.shape[0] == len(tree) + 1, (target_probs.shape, len(tree))
    draws = TorchDraws(randomness) if isinstance(randomness, torch.Generator) else randomness
    assert tree.draft_probs is not None or len(tree) == 0, "sampled verification needs draft distributions"
    accepted: list[int] = []
    node = ROOT
    while True:
        residual = target_probs[node + 1].clone()
        chosen = None
        for child in tree.children(node):
            token = tree.token_ids[child]
            draft = tree.draft_probs[child]
            accept_probability = _ratio(residual[token], draft[token])
            if draws.bernoulli(accept_probability):
                chosen = child
                break
            residual = _residual(residual, draft)
        if chosen is None:
            return Acceptance(tuple(accepted), draws.categorical(residual))
        accepted.append(chosen)
        node = chosen


def _ratio(target_p: torch.Tensor, draft_p: torch.Tensor) -> float:
    if draft_p <= 0:
        return 0.0  # the draft could not have sampled it; never accept
    return min(1.0, float(target_p / draft_p))


def _residual(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """Normalised max(0, target - draft); if nothing is left (target == draft), the target itself."""
    residual = torch.clamp(target - draft, min=0.0)
    total = residual.sum()
    return residual / total if total > 0 else target
