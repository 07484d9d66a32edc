"""The drafter's token tree: where to branch, what to propose, what survives a verdict. No model calls.

Shape rule (best-first on estimated path probabilities). A *candidate* is "the r-th child of node n"; its
prior is path_prob(n) × the chance that the committed sequence continues through that child once it has
reached n. That chance is learned online from the session's verdicts. Sampling: ``RankAcceptance``,
Sequoia's acceptance vector by sibling rank, kept separately by how sure the draft is at n (the bucket of its
top probability), so the tree branches where the draft is unsure *and* such nodes are in fact often
rejected (the raw draft probability is a poor stand-in there: a draft equal to the target at a flat
distribution would have its first choice always accepted). Greedy: the r-th child is the draft's r-th most
likely token, known before it is drafted, and the target keeps it exactly when it is the target's argmax,
so ``CalibratedProbability`` uses the draft's probability of that token, corrected by how often tokens of
such probability were in fact the target's (a distilled draft is close to calibrated, another may not
be). Each growth step drafts, in one forward pass, the best candidate plus up to
``max_branches`` - 1 more whose prior beats what the best one's own child is expected to get (best prior ×
its per-step factor): DuoDecoding's rule (branch on the top-k first tokens when their probability beats the
product of the first two greedy probabilities), generalised to any depth. A proposal is the best
``budget`` nodes, chosen best-first by prior.

Lossless sampling constrains this: whether a node exists may depend on anything except its own token.
Priors are fixed before a node's token is drawn (from its parent's distribution and rank), so both the
growth and the proposal choice satisfy that; the r-th child is drawn from the parent's distribution with
the earlier children zeroed and renormalised (sampling without replacement), and carries that
distribution to the verifier (Sequoia's rule, see duo_common/acceptance.py).

Re-rooting: when the verifier commits tokens, the tree is walked along them; if they end on a drafted node
(after a full acceptance, the target's next token among the drafted hedges; after a rejection, its
correction among unproposed siblings), that node's subtree becomes the next tree, its nodes already drafted.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from duo.common.tree import ROOT, TokenTree, path_along

MAX_WIDTH = 8  # the most children per node any request may ask for


@dataclass
class DraftNode:
    token: int
    parent: int  # index of the parent node; ROOT for the root's children
    depth: int  # 1 for the root's children
    rank: int  # 0 for the first child drafted under its parent, 1 for the next, ...
    prior: float  # estimated chance that the committed sequence reaches it, fixed before its token was drawn
    draft_probs: torch.Tensor | None  # [vocab] what its token was drawn from; None for greedy
    next_probs: torch.Tensor | None = None  # [vocab] the draft's distribution for its children, once fed
    top_probs: list[float] = field(default_factory=list)  # the MAX_WIDTH largest of next_probs
    children: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    parent: int
    rank: int
    prior: float
    factor: float  # prior / path_prob(parent): the per-step chance of continuing through this child


def _bucket(upper_edges: tuple[float, ...], value: float) -> int:
    """Index of the first bucket whose upper edge exceeds ``value`` (the last bucket has none)."""
    return next((index for index, edge in enumerate(upper_edges) if value < edge), len(upper_edges))


class RankAcceptance:
    """P(the verifier accepts the rank-r child | ranks < r were rejected), per sibling rank r and per bucket
    of the draft's top probability at the parent; learned from the session's verdicts, starting from a
    Beta prior of ``weight`` pseudo-observations (rank 0 at the bucket's middle, later ranks lower)."""

    BUCKETS = (0.3, 0.6, 0.9)  # upper edges; the last bucket is [0.9, 1]
    sees_every_sibling = False  # the verifier tries siblings in rank order and stops at an acceptance

    def __init__(self, weight: float = 4.0):
        middles = (0.2, 0.45, 0.75, 0.95)
        self._accepted = [[weight * middle * 0.5 ** min(rank, 1) for rank in range(MAX_WIDTH)] for middle in middles]
        self._tried = [[weight] * MAX_WIDTH for _ in middles]

    def record(self, top: list[float], rank: int, accepted: bool) -> None:
        bucket = _bucket(self.BUCKETS, top[0])
        self._tried[bucket][rank] += 1.0
        self._accepted[bucket][rank] += float(accepted)

    def through(self, top: list[float], rank: int) -> float:
        """P(the committed sequence continues through the rank-``rank`` child, given its parent);
        ``top``: the parent's largest draft probabilities."""
        bucket = _bucket(self.BUCKETS, top[0])
        accepted, tried = self._accepted[bucket], self._tried[bucket]
        chance = 1.0
        for earlier in range(rank):
            chance *= 1.0 - accepted[earlier] / tried[earlier]
        return chance * accepted[rank] / tried[rank]


class CalibratedProbability:
    """Greedy: P(the target's argmax is the draft's rank-r token) = its draft probability q × a correction
    learned per bucket of q (observed hits over the hits q predicted, from a prior of ``weight``
    pseudo-observations at ratio 1), so the order of tokens inside a bucket is kept."""

    BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # upper edges
    sees_every_sibling = True  # greedy verification compares every child with the target's argmax

    def __init__(self, weight: float = 4.0):
        self._hits = [weight] * (len(self.BUCKETS) + 1)
        self._predicted = [weight] * (len(self.BUCKETS) + 1)

    def record(self, top: list[float], rank: int, accepted: bool) -> None:
        bucket = _bucket(self.BUCKETS, top[rank])
        self._hits[bucket] += float(accepted)
        self._predicted[bucket] += top[rank]

    def through(self, top: list[float], rank: int) -> float:
        bucket = _bucket(self.BUCKETS, top[rank])
        return min(1.0, top[rank] * self._hits[bucket] / self._predicted[bucket])


ChildAcceptance = RankAcceptance | CalibratedProbability


class DraftTree:
    """Nodes in drafting order (parents before children, siblings in rank order)."""

    def __init__(self) -> None:
        self.nodes: list[DraftNode] = []
        self.root_children: list[int] = []
        self.root_probs: torch.Tensor | None = None  # [vocab] after the root; None until the root is fed
        self.root_top: list[float] = []

    def __len__(self) -> int:
        return len(self.nodes)

    def set_next_probs(self, node: int, probs: torch.Tensor) -> None:
        top = torch.topk(probs, min(MAX_WIDTH, probs.shape[-1])).values.tolist()
        if node == ROOT:
            self.root_probs, self.root_top = probs, top
        else:
            self.nodes[node].next_probs, self.nodes[node].top_probs = probs, top

    def children(self, node: int) -> list[int]:
        return self.root_children if node == ROOT else self.nodes[node].children

    def token(self, node: int) -> int:
        return self.nodes[node].token

    def next_probs(self, node: int) -> torch.Tensor | None:
        return self.root_probs if node == ROOT else self.nodes[node].next_probs

    def depth(self, node: int) -> int:
        return 0 if node == ROOT else self.nodes[node].depth

    def path_prob(self, node: int) -> float:
        return 1.0 if node == ROOT else self.nodes[node].prior

    def candidates(self, max_branches: int, expandable, ranks: ChildAcceptance) -> list[Candidate]:
        """Every possible next child (at most ``max_branches`` per node), best prior first."""
        found = []
        for node in [ROOT, *range(len(self.nodes))]:
            top = self.root_top if node == ROOT else self.nodes[node].top_probs
            if not top or not expandable(node):
                continue
            for rank in range(len(self.children(node)), min(max_branches, len(top))):
                if top[rank] <= 0.0:
                    break  # nothing left to draw a further sibling from
                factor = ranks.through(top, rank)
                found.append(Candidate(node, rank, self.path_prob(node) * factor, factor))
        found.sort(key=lambda candidate: -candidate.prior)
        return found

    def next_batch(self, max_branches: int, expandable, ranks: ChildAcceptance) -> list[Candidate]:
        """What one forward pass drafts: the best candidate, and up to ``max_branches`` - 1 others whose prior
        beats the best one's expected child (so a confident draft grows a chain, an unsure one branches)."""
        found = self.candidates(max_branches, expandable, ranks)
        if not found:
            return []
        best = found[0]
        bar = best.prior * best.factor
        return [best] + [c for c in found[1:max_branches] if c.prior > bar]

    def observe(self, proposed: set[int], committed: list[int], ranks: ChildAcceptance) -> None:
        """Record, along the committed tokens, which proposed children the verifier tried and accepted
        (greedy verification compares every child, sampled verification tries them in rank order)."""
        node = ROOT
        for token in committed:
            children = [child for child in self.children(node) if child in proposed]
            accepted = next((child for child in children if self.nodes[child].token == token), None)
            top = self.root_top if node == ROOT else self.nodes[node].top_probs
            for child in children:
                ranks.record(top, self.nodes[child].rank, child == accepted)
                if child == accepted and not ranks.sees_every_sibling:
                    break
            if accepted is None:
                return
            node = accepted

    def add(self, parent: int, token: int, prior: float, draft_probs: torch.Tensor | None) -> int:
        index = len(self.nodes)
        self.nodes.append(DraftNode(
            token=token, parent=parent, depth=self.depth(parent) + 1, rank=len(self.children(parent)), prior=prior,
            draft_probs=draft_probs,
        ))
        self.children(parent).append(index)
        return index

    def ancestors(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` itself."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.nodes[node].parent
        return path[::-1]

    def select(self, budget: int, max_branches: int) -> list[int]:
        """The best ``budget`` nodes by prior, best-first from the root (a subtree; parents first)."""
        heap = [(-self.nodes[c].prior, c) for c in self.root_children if self.nodes[c].rank < max_branches]
        heapq.heapify(heap)
        chosen: list[int] = []
        while heap and len(chosen) < budget:
            _, node = heapq.heappop(heap)
            chosen.append(node)
            for child in self.nodes[node].children:
                if self.nodes[child].rank < max_branches:
                    heapq.heappush(heap, (-self.nodes[child].prior, child))
        return chosen

    def proposal(self, chosen: list[int], with_probs: bool) -> TokenTree:
        """The chosen nodes as a TokenTree, siblings in rank order (the order the verifier tries them)."""
        ordered = sorted(chosen)  # drafting order: parents first, siblings by rank
        position = {node: index for index, node in enumerate(ordered)}
        parents = tuple(ROOT if self.nodes[n].parent == ROOT else position[self.nodes[n].parent] for n in ordered)
        probs = torch.stack([self.nodes[n].draft_probs for n in ordered]) if with_probs and ordered else None
        return TokenTree(tuple(self.nodes[n].token for n in ordered), parents, probs)

    def descend(self, tokens: list[int]) -> list[int]:
        """The drafted nodes along ``tokens`` from the root, as far as they match."""
        return path_along(self, tokens)

    def subtree(self, node: int) -> list[int]:
        """Descendants of ``node`` (not itself), in index order."""
        inside = {node}
        for index in range(node + 1, len(self.nodes)):
            if self.nodes[index].parent in inside:
                inside.add(index)
        inside.discard(node)
        return sorted(inside)

    def rerooted(self, node: int) -> DraftTree:
        """The subtree under ``node`` as a tree of its own (``node`` becomes the root), indices compacted."""
        kept = self.subtree(node)
        new_index = {old: new for new, old in enumerate(kept)}
        scale = max(self.nodes[node].prior, 1e-300)
        tree = DraftTree()
        tree.set_next_probs(ROOT, self.nodes[node].next_probs)
        depth = self.nodes[node].depth
        for old in kept:
            source = self.nodes[old]
            parent = ROOT if source.parent == node else new_index[source.parent]
            tree.nodes.append(DraftNode(
                token=source.token, parent=parent, depth=source.depth - depth, rank=source.rank,
                prior=source.prior / scale, draft_probs=source.draft_probs,
                next_probs=source.next_probs, top_probs=source.top_probs,
            ))
            tree.children(parent).append(new_index[old])
        return tree
