"""The draft model's side of one session: token trees that continue the committed sequence.

KV layout: the cache holds the committed tokens fed so far (``fed``), then every node of the draft tree in
drafting order (node i at slot fed + i). Each growth step feeds a batch of new nodes in one forward pass,
each seeing the committed prefix, its own ancestors and itself (a tree attention mask; a batch that just
extends a chain needs none). When the verifier commits tokens, the nodes along them join the committed
prefix and, if the committed tokens end on a drafted node, that node's subtree is kept: the cache keeps
exactly those slots (``select_cache_positions``), or is cropped to the common prefix. It is never
re-prefilled. With ``max_branches`` 1 the tree is a chain and this is plain chain drafting.

Every distribution the draft model gives is first mixed with a copy from the context (``ContextCopy``: the
token that followed the last earlier occurrence of the current suffix, at its measured hit rate), unless
``context_copy`` is off.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from duo.draft_service.context_copy import ContextCopy
from duo.draft_service.draft_tree import MAX_WIDTH, CalibratedProbability, DraftTree, RankAcceptance
from duo.common import batched_forward
from duo.common.batched_forward import NewTokens
from duo.common.decoder_ops import SHORT_QUERY_TOKENS
from duo.common.kv_cache import new_cache
from duo.common.models import select_cache_positions, truncate_cache
from duo.common.params import DecodingParams
from duo.common.pass_scheduler import PassScheduler
from duo.common.sampling import derived_seed, logits_to_probs, make_generator, race, race_noise, sample, without_tokens
from duo.common.tree import ROOT, TokenTree


class TreeDrafter:
    def __init__(
        self,
        model: torch.nn.Module,
        params: DecodingParams,
        target_vocab_size: int,
        stop_token_ids: frozenset[int],
        max_tokens: int,
        max_branches: Callable[[], int] = lambda: 1,
        tree_attention: bool = False,
        context_copy: bool = True,
        passes: PassScheduler | None = None,
        gone: Callable[[], bool] | None = None,
    ):
        self._model = model
        self._passes = passes  # forward passes shared with the service's other sessions (None: alone)
        self._gone = gone  # the session's caller has gone: its queued forwards are dropped (Cancelled)
        self._params = params
        self._generator = make_generator(derived_seed(params.seed, "draft"))  # unseeded sampling's draws
        self._race_noise: dict[int, torch.Tensor] = {}  # seeded sampling: the target's noise, by position
        self._target_vocab_size = target_vocab_size
        self._stop_token_ids = stop_token_ids  # drafting past these is wasted work
        self._max_tokens = max_tokens  # longest sequence the drafter may build (context limit)
        self._max_branches = max_branches
        self._tree_attention = tree_attention  # False: the draft model takes no custom mask, chains only
        self._cache = new_cache(model.config)
        self._committed: list[int] = []
        self._fed = 0  # committed tokens in the cache; the tree's nodes follow them
        self._tree = DraftTree()
        self._proposed: set[int] = set()  # the last proposal's nodes (to learn rank acceptance from the verdict)
        self._ranks = CalibratedProbability() if params.is_greedy else RankAcceptance()
        self._copy = ContextCopy() if context_copy else None
        self.compute_s = 0.0
        self.tokens_drafted = 0

    @property
    def width(self) -> int:
        """Children per node this round: the session's max_branches, 1 without tree attention."""
        return max(1, min(self._max_branches(), MAX_WIDTH)) if self._tree_attention else 1

    def prefill(self, prompt: list[int]) -> None:
        """Feed the prompt ahead of time (overlapping the target's prefill)."""
        self.commit(list(prompt))
        self.grow()

    def commit(self, committed: list[int]) -> None:
        """Adopt the committed sequence, keeping the drafted nodes that still lie on or below it."""
        started = time.perf_counter()
        previous = self._committed
        extends = committed[: len(previous)] == previous and self._fed == len(previous)
        if extends and len(committed) > len(previous):
            new = committed[len(previous):]
            self._tree.observe(self._proposed, new, self._ranks)
            path = self._tree.descend(new)
            kept = path + (self._tree.subtree(path[-1]) if len(path) == len(new) else [])
            select_cache_positions(self._cache, self._fed, torch.tensor([self._fed + i for i in kept], dtype=torch.long))
            self._tree = self._tree.rerooted(path[-1]) if kept and len(path) == len(new) else DraftTree()
            self._fed += len(path)
        elif not extends:
            common = _common_prefix(previous[: self._fed], committed)
            truncate_cache(self._cache, common)
            self._fed = common
            self._tree = DraftTree()
        self._committed = list(committed)
        self._race_noise = {position: noise for position, noise in self._race_noise.items()
                            if position >= len(committed)}
        if self._copy is not None:
            self._copy.observe(self._committed)
        self._proposed = set()
        self.compute_s += time.perf_counter() - started

    def propose(self, max_nodes: int) -> TokenTree:
        """The best tree of at most ``max_nodes`` nodes after the committed sequence, drafting what is missing."""
        while len(self._tree.select(max_nodes, self.width)) < max_nodes and self.grow():
            pass
        chosen = self._tree.select(max_nodes, self.width)
        self._proposed = set(chosen)
        return self._tree.proposal(chosen, with_probs=self._params.needs_draft_probs)

    def grow_ahead(self, target_nodes: int) -> bool:
        """Draft ahead (while the verifier works) until the tree holds ``target_nodes`` × width nodes; in
        background passes where the draft model is shared (other sessions' proposals go first)."""
        return len(self._tree) < target_nodes * self.width and self.grow(background=True)

    def grow(self, background: bool = False) -> bool:
        """One forward pass: feed committed tokens not yet fed, else the best candidates. False: nothing to do."""
        started = time.perf_counter()
        try:
            if self._fed < len(self._committed):
                tail = self._committed[self._fed:]
                logits = self._forward(tail, None, 1, background)
                self._fed = len(self._committed)
                self._tree.set_next_probs(ROOT, self._probs(logits[-1], ROOT))
                return True
            if self._tree.root_probs is None:
                return False
            return self._grow_tree(background)
        finally:
            self.compute_s += time.perf_counter() - started

    def _grow_tree(self, background: bool) -> bool:
        width = self.width
        chosen = self._tree.next_batch(width, self._expandable, self._ranks)
        added = []
        for candidate in sorted(chosen, key=lambda c: (c.parent, c.rank)):
            siblings = [self._tree.nodes[child].token for child in self._tree.children(candidate.parent)]
            distribution = without_tokens(self._tree.next_probs(candidate.parent), siblings)
            if distribution is None:
                continue  # no probability left for another sibling
            token, draft_probs = self._draw(distribution, candidate.parent)
            # the prior, never the drawn token's probability: a node's fate must not depend on its own token
            added.append(self._tree.add(candidate.parent, token, candidate.prior, draft_probs))
        if not added:
            return False
        logits = self._forward([self._tree.nodes[node].token for node in added], added, len(added), background)
        for row, node in enumerate(added):
            self._tree.set_next_probs(node, self._probs(logits[row], node))
        self.tokens_drafted += len(added)
        return True

    def _draw(self, distribution: torch.Tensor, parent: int) -> tuple[int, torch.Tensor | None]:
        """A child's token, and the distribution to send with it when the verifier needs one. Seeded sampling
        runs the target's race (same seed, same position) on the draft's distribution: where the two
        distributions agree on the winner, the drafted token is the one the target will draw."""
        if self._params.is_greedy:
            return int(distribution.argmax()), None
        if self._params.is_seeded_sampling:
            position = len(self._committed) + self._tree.depth(parent)
            if position not in self._race_noise:
                self._race_noise[position] = race_noise(self._params.seed, position, distribution.shape[-1])
            return int(race(distribution, self._race_noise[position])), None
        return sample(distribution, self._generator), distribution

    def _expandable(self, node: int) -> bool:
        token = self._committed[-1] if node == ROOT else self._tree.nodes[node].token
        if node != ROOT and token in self._stop_token_ids:
            return False
        return len(self._committed) + self._tree.depth(node) < self._max_tokens

    def _probs(self, logits: torch.Tensor, node: int) -> torch.Tensor:
        """The distribution for the children of ``node``: what the drafter samples from (sampling), or whose
        top tokens it drafts (greedy: the softmax, whose probabilities also shape the tree); then mixed with
        the context's copy."""
        logits = _pad_vocab(logits, self._target_vocab_size)
        probs = torch.softmax(logits, dim=-1) if self._params.is_greedy else logits_to_probs(logits, self._params)
        if self._copy is None:
            return probs
        path = tuple(self._tree.nodes[n].token for n in self._tree.ancestors(node))
        return self._copy.mix(probs, self._copy.suggest(path))

    def _forward(self, tokens: list[int], nodes: list[int] | None, kept_logits: int, background: bool
                 ) -> torch.Tensor:
        """Logits [kept_logits, vocab] (float32, CPU) of the last fed rows; ``nodes``: the tree nodes being fed
        (None: committed tokens); ``background``: drafting ahead (``PassScheduler.run``)."""
        positions = visible = None
        if nodes is not None and not self._extends_chain(nodes):
            positions, visible = self._tree_layout(nodes)
        tokens = NewTokens(tuple(tokens), self._cache, positions, visible, kept_logits)
        if self._passes is not None:
            return self._passes.forward(self, tokens, background, self._gone)
        return batched_forward.forward(self._model, [tokens], SHORT_QUERY_TOKENS)[0]

    def _extends_chain(self, nodes: list[int]) -> bool:
        """One new node below all the others: the plain causal mask is already right."""
        return len(nodes) == 1 and len(self._tree.ancestors(nodes[0])) == len(self._tree)

    def _tree_layout(self, nodes: list[int]) -> tuple[tuple[int, ...], torch.Tensor]:
        """Positions and visibility [nodes, cached + nodes] of the tree's newest ``nodes``."""
        first = len(self._tree) - len(nodes)  # the new nodes are the last ones
        visible = torch.zeros(len(nodes), self._fed + len(self._tree), dtype=torch.bool)
        visible[:, : self._fed] = True
        positions = []
        for row, node in enumerate(nodes):
            assert node == first + row
            visible[row, [self._fed + ancestor for ancestor in self._tree.ancestors(node)]] = True
            positions.append(len(self._committed) - 1 + self._tree.depth(node))
        return tuple(positions), visible


def _pad_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Give draft logits the target's vocabulary size (padding ids the draft cannot produce)."""
    if logits.shape[-1] >= vocab_size:
        return logits[..., :vocab_size]
    return torch.cat([logits, logits.new_full((vocab_size - logits.shape[-1],), float("-inf"))])


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = min(len(a), len(b))
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length
