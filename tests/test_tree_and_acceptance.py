"""The token tree and the acceptance rule, as pure functions."""


import pytest
import torch

from duo.common.acceptance import accept_greedy, accept_sampled
from duo.common.errors import InvalidArgument
from duo.common.params import DecodingParams
from duo.common.sampling import logits_to_probs
from duo.common.tree import TokenTree


def one_hot_logits(tokens, vocab=10):
    logits = torch.full((len(tokens), vocab), -5.0)
    for row, token in enumerate(tokens):
        logits[row, token] = 5.0
    return logits


def test_chain_structure():
    chain = TokenTree.chain([4, 5, 6])
    assert chain.parents == (-1, 0, 1)
    assert chain.is_chain and chain.depths() == [1, 2, 3]
    assert torch.equal(chain.ancestor_mask(), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_tree_mask_sees_only_ancestors():
    #   root ─ 0 ─ 2
    #        └ 1 ─ 3
    tree = TokenTree((4, 5, 6, 7), (-1, -1, 0, 1))
    mask = tree.ancestor_mask()
    assert not tree.is_chain and tree.depths() == [1, 1, 2, 2]
    assert mask[3].tolist() == [True, True, False, True, False]  # node 2 sees root, node 0, itself
    assert mask[4].tolist() == [True, False, True, False, True]  # node 3 sees root, node 1, itself


@pytest.mark.parametrize("tree, message", [
    (TokenTree((4, 5), (-1,)), "parent indices"),
    (TokenTree((4, 5), (-1, 2)), "parent 2"),
    (TokenTree((4, 5), (1, -1)), "parents precede children"),
    (TokenTree((4, 5), (-1, -2)), "parent -2"),
    (TokenTree((4, 10), (-1, 0)), "outside the vocabulary"),
    (TokenTree((4, -1), (-1, 0)), "outside the vocabulary"),
    (TokenTree.chain(range(6)), "at most 5"),
])
def test_malformed_trees_are_refused(tree, message):
    with pytest.raises(InvalidArgument, match=message):
        tree.validate(vocab_size=10, max_nodes=5)


def test_greedy_accepts_the_matching_prefix_then_corrects():
    chain = TokenTree.chain([3, 4, 5])
    # the target wants 3, 4, then 9 (not 5): two accepted, correction 9
    result = accept_greedy(chain, one_hot_logits([3, 4, 9, 1]))
    assert result.accepted_nodes == (0, 1) and result.next_token == 9


def test_greedy_full_acceptance_gives_the_bonus():
    result = accept_greedy(TokenTree.chain([3, 4]), one_hot_logits([3, 4, 7]))
    assert result.accepted_nodes == (0, 1) and result.next_token == 7


def test_greedy_follows_the_branch_the_target_chooses():
    tree = TokenTree((3, 4, 6, 8), (-1, -1, 1, 1))  # root → {3, 4}; 4 → {6, 8}
    logits = one_hot_logits([4, 0, 8, 0, 0])  # rows: root, node0, node1, node2, node3
    logits[3 + 1] = one_hot_logits([2])[0]  # after node 3 (token 8) the target wants 2
    result = accept_greedy(tree, logits)
    assert result.accepted_nodes == (1, 3) and result.next_token == 2


def test_empty_proposal_yields_the_targets_token():
    assert accept_greedy(TokenTree.empty(), one_hot_logits([6])).next_token == 6




@pytest.mark.parametrize("seed", range(3))
def test_sampled_rule_matches_target_distribution_monte_carlo(seed):
    """accept_sampled on a two-child root: the first committed token follows the target distribution."""
    generator = torch.Generator().manual_seed(seed)
    vocab = 6
    target = torch.softmax(torch.randn(vocab, generator=generator) * 1.5, dim=0)
    draft = torch.softmax(torch.randn(vocab, generator=generator) * 1.5, dim=0)
    samples = 20_000
    counts = torch.zeros(vocab)
    for _ in range(samples):
        first = int(torch.multinomial(draft, 1, generator=generator))
        second = int(torch.multinomial(draft, 1, generator=generator))
        tree = TokenTree((first, second), (-1, -1), torch.stack([draft, draft]))
        target_rows = torch.stack([target, target, target])
        result = accept_sampled(tree, target_rows, generator)
        token = tree.token_ids[result.accepted_nodes[0]] if result.accepted_nodes else result.next_token
        counts[token] += 1
    empirical = counts / samples
    assert (empirical - target).abs().sum() < 0.04, (empirical, target)


def test_logits_to_probs_greedy_is_one_hot_and_filters_compose():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert logits_to_probs(logits, DecodingParams()).tolist() == [0, 1, 0, 0]
    top_k = logits_to_probs(logits, DecodingParams(temperature=1.0, top_k=2))
    assert top_k[0] == 0 and top_k[3] == 0 and torch.isclose(top_k.sum(), torch.tensor(1.0))
    top_p = logits_to_probs(logits, DecodingParams(temperature=1.0, top_p=0.5))
    assert top_p.tolist() == [0, 1, 0, 0]  # the top token alone already holds more than half
    hot = logits_to_probs(logits, DecodingParams(temperature=0.01))
    assert hot.argmax() == 1 and hot[1] > 0.99
