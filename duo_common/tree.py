"""The token tree a drafter proposes and a verifier scores in one forward pass.

Node i holds ``token_ids[i]`` and hangs under ``parents[i]`` (-1: the root, i.e. the last committed token,
which the verifier feeds in front of the nodes). Parents precede children, so a tree can have no cycle.
A chain is the tree whose node i hangs under node i - 1.

Walking a tree along tokens (``child_with_token``, ``path_along``) is the same for the proposal and for the
drafter's own tree (``duo.draft_service.draft_tree``): both answer ``children`` and ``token``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from duo.common.errors import InvalidArgument

if TYPE_CHECKING:  # torch is imported where a tensor is made: a client reads this module without it
    import torch

ROOT = -1

# Token-tree width (children per node; 1: chains) where neither the client nor the request says: with duo's
# default draft, width 3 commits at least as many tokens per round as width 2 at 4 and 8 nodes in the
# drafter simulation (benchmarks/draft_quality.py; the figures are in benchmarks/RESULTS.md).
DEFAULT_MAX_BRANCHES = 3


@dataclass(frozen=True)
class TokenTree:
    token_ids: tuple[int, ...]
    parents: tuple[int, ...]
    # The distribution each node was sampled from (given its earlier siblings); None for greedy.
    draft_probs: torch.Tensor | None = field(default=None, compare=False)  # [num_nodes, vocab]

    @classmethod
    def chain(cls, token_ids: list[int] | tuple[int, ...], draft_probs: torch.Tensor | None = None) -> TokenTree:
        return cls(tuple(token_ids), tuple(range(-1, len(token_ids) - 1)), draft_probs)

    @classmethod
    def empty(cls) -> TokenTree:
        return cls((), ())

    def __len__(self) -> int:
        return len(self.token_ids)

    def validate(self, vocab_size: int, max_nodes: int) -> None:
        """Raise InvalidArgument, with a message a caller can act on, unless the tree is well formed."""
        if len(self.parents) != len(self.token_ids):
            raise InvalidArgument(
                f"tree has {len(self.token_ids)} token ids but {len(self.parents)} parent indices"
            )
        if len(self.token_ids) > max_nodes:
            raise InvalidArgument(f"tree has {len(self.token_ids)} nodes; this verifier accepts at most {max_nodes}")
        for index, (token, parent) in enumerate(zip(self.token_ids, self.parents)):
            if not 0 <= token < vocab_size:
                raise InvalidArgument(f"node {index}: token id {token} is outside the vocabulary [0, {vocab_size})")
            if not ROOT <= parent < index:
                raise InvalidArgument(
                    f"node {index}: parent {parent} must be -1 (root) or an earlier node (parents precede "
                    "children, which also rules out cycles)"
                )
        if self.draft_probs is not None and tuple(self.draft_probs.shape) != (len(self), vocab_size):
            raise InvalidArgument(
                f"draft distributions have shape {tuple(self.draft_probs.shape)}, expected ({len(self)}, {vocab_size})"
            )

    @property
    def is_chain(self) -> bool:
        return all(parent == index - 1 for index, parent in enumerate(self.parents))

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (ROOT for the root's), in proposal order."""
        return [index for index, parent in enumerate(self.parents) if parent == node]

    def token(self, node: int) -> int:
        return self.token_ids[node]

    def depths(self) -> list[int]:
        """Depth of each node; the root's children have depth 1."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent == ROOT else depths[parent] + 1)
        return depths

    def ancestor_mask(self) -> torch.Tensor:
        """[num_nodes + 1, num_nodes + 1] bool: row r may attend to column c (root is row/column 0)."""
        import torch

        size = len(self) + 1
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[:, 0] = True
        mask[0, 0] = True
        for index, parent in enumerate(self.parents):
            row = index + 1
            if parent != ROOT:
                mask[row] = mask[parent + 1]
            mask[row, row] = True
            mask[row, 0] = True
        return mask


class TokenNodes(Protocol):
    """A tree of tokens as a walk needs it: node indices, ROOT for the root."""

    def children(self, node: int) -> list[int]: ...
    def token(self, node: int) -> int: ...


def child_with_token(tree: TokenNodes, node: int, token: int) -> int | None:
    """The first child of ``node``, in proposal order, that holds ``token``; None if none does."""
    return next((child for child in tree.children(node) if tree.token(child) == token), None)


def path_along(tree: TokenNodes, tokens: Sequence[int]) -> list[int]:
    """The nodes from the root down along ``tokens``, as far as the tree holds them."""
    path, node = [], ROOT
    for token in tokens:
        node = child_with_token(tree, node, token)
        if node is None:
            break
        path.append(node)
    return path
