"""Lossless sampling with chains and trees.

* Exact: every outcome of drafting (i.i.d. or without replacement) and of accept_sampled's random choices
  is enumerated with its probability (``enumerate_outcomes`` runs the real rule once per branch of its
  choices); the committed sequences have exactly the target's distribution.
* Seeded sampling (the exponential race on noise fixed by seed and position): the race draws from the
  distribution, the rule commits the race's winners whatever the tree, and through the whole stack a seeded
  answer is the target's own for that seed, whatever the budget and the tree width.
* Monte Carlo through the whole stack (orchestrator → draft service → verify service, tiny models), unseeded
  and seeded: the total-variation distance to the target's exact distribution of the first three tokens
  shrinks with the number of samples.
* Edge cases.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import grpc
import pytest
import torch

from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common.acceptance import accept_sampled, accept_seeded
from duo.common.params import DecodingParams, StoppingParams
from duo.common.sampling import derived_seed, logits_to_probs, race, race_noise, race_noise_rows, without_tokens
from duo.common.tree import ROOT, TokenTree
from tests.inprocess import running_pair
from tests.tiny_models import build_model, perturbed_copy, reference_greedy, reference_seeded, word_tokenizer

# ─────────────────────────── exact enumeration of a randomised procedure ───────────────────────────


class _Branch(Exception):
    def __init__(self, options: list[tuple[object, float]]):
        self.options = options


class ScriptedDraws:
    """Replays scripted choices; at the first unscripted choice, raises _Branch with every option."""

    def __init__(self, script: list[tuple[object, float]]):
        self._script = script
        self._next = 0

    def _choose(self, options: list[tuple[object, float]]):
        if self._next < len(self._script):
            self._next += 1
            return self._script[self._next - 1][0]
        raise _Branch([(value, p) for value, p in options if p > 0])

    def bernoulli(self, probability: float) -> bool:
        probability = min(max(float(probability), 0.0), 1.0)
        return self._choose([(True, probability), (False, 1.0 - probability)])

    def categorical(self, probs: torch.Tensor) -> int:
        probs = probs.double() / probs.double().sum()
        return self._choose([(token, float(p)) for token, p in enumerate(probs)])


def enumerate_outcomes(procedure) -> dict:
    """{outcome: exact probability} of ``procedure(draws)`` over all its random choices."""
    distribution: dict = {}
    pending = [[]]
    while pending:
        script = pending.pop()
        try:
            outcome = procedure(ScriptedDraws(script))
        except _Branch as branch:
            pending.extend(script + [option] for option in branch.options)
            continue
        weight = math.prod(p for _, p in script)
        for value, p in (outcome.items() if isinstance(outcome, dict) else [(outcome, 1.0)]):
            distribution[value] = distribution.get(value, 0.0) + weight * p
    return distribution


# ─────────────────────────── Markov "models": next-token tables ───────────────────────────

VOCAB = 4


def markov_table(seed: int, sparse: bool = False) -> torch.Tensor:
    """[VOCAB, VOCAB]: row t = distribution of the next token after t."""
    generator = torch.Generator().manual_seed(seed)
    table = torch.softmax(torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float64) * 1.5, dim=-1)
    if sparse:  # top-k/top-p style zeros
        table[:, 0] = 0.0
        table[torch.arange(VOCAB), torch.arange(VOCAB)] = 0.0
        table /= table.sum(dim=-1, keepdim=True)
    return table


@dataclass(frozen=True)
class Pair:
    target: torch.Tensor
    draft: torch.Tensor


PAIRS = {
    "different": Pair(markov_table(0), markov_table(1)),
    "identical": Pair(markov_table(0), markov_table(0)),
    "disjoint": Pair(torch.tensor([[0.5, 0.5, 0, 0]] * 2 + [[0.3, 0.7, 0, 0]] * 2, dtype=torch.float64),
                     torch.tensor([[0, 0, 0.5, 0.5]] * 4, dtype=torch.float64)),
    "sparse draft": Pair(markov_table(2), markov_table(3, sparse=True)),
    "sparse target": Pair(markov_table(4, sparse=True), markov_table(5)),
    "one-hot draft": Pair(markov_table(6), torch.eye(VOCAB, dtype=torch.float64).roll(1, dims=1)),
}
ROOT_TOKEN = 1

# Tree shapes as parent lists in drafting order (siblings in rank order).
SHAPES = {
    "chain of 3": (ROOT, 0, 1),
    "3 children, the first with a child": (ROOT, ROOT, ROOT, 0),
    "2 children, the first with 2 children": (ROOT, ROOT, 0, 0),
    "2 children, each with a child": (ROOT, ROOT, 0, 1),
}


def draft_tree(pair: Pair, shape: tuple[int, ...], draws, without_replacement: bool) -> TokenTree:
    """Draw a tree of the given shape from the draft; a sibling with no probability left is skipped
    (with its subtree), as the drafter does."""
    tokens, parents, probs, index_of = [], [], [], {}
    for node, parent in enumerate(shape):
        if parent != ROOT and parent not in index_of:
            continue  # the parent was skipped
        parent_index = ROOT if parent == ROOT else index_of[parent]
        parent_token = ROOT_TOKEN if parent == ROOT else tokens[parent_index]
        siblings = [tokens[i] for i, p in enumerate(parents) if p == parent_index]
        base = pair.draft[parent_token].float()
        distribution = without_tokens(base, siblings) if without_replacement else base
        if distribution is None:
            continue
        index_of[node] = len(tokens)
        tokens.append(draws.categorical(distribution))
        parents.append(parent_index)
        probs.append(distribution)
    return TokenTree(tuple(tokens), tuple(parents), torch.stack(probs) if probs else None)


def committed_prefix(pair: Pair, shape, without_replacement: bool, length: int):
    """One speculative round; its committed tokens, completed to ``length`` by the target itself."""

    def procedure(draws):
        tree = draft_tree(pair, shape, draws, without_replacement)
        rows = [ROOT_TOKEN, *tree.token_ids]
        target_probs = pair.target[rows].float()
        acceptance = accept_sampled(tree, target_probs, draws)
        committed = tuple(tree.token_ids[n] for n in acceptance.accepted_nodes) + (acceptance.next_token,)
        return completions(pair.target, committed[:length], length)

    return procedure


def completions(target: torch.Tensor, prefix: tuple[int, ...], length: int) -> dict:
    """{sequence: probability} of extending ``prefix`` to ``length`` tokens with the target's own distribution."""
    if len(prefix) == length:
        return {prefix: 1.0}
    out = {}
    for token in range(VOCAB):
        p = float(target[prefix[-1], token])
        if p > 0:
            for sequence, q in completions(target, prefix + (token,), length).items():
                out[sequence] = out.get(sequence, 0.0) + p * q
    return out


def target_sequences(target: torch.Tensor, length: int) -> dict:
    return {seq[1:]: p for seq, p in completions(target, (ROOT_TOKEN,), length + 1).items()}


@pytest.mark.parametrize("without_replacement", [True, False], ids=["without-replacement", "iid"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
def test_committed_sequences_have_exactly_the_targets_distribution(pair, shape, without_replacement):
    depth = 3 if len(shape) == 3 else 2
    got = enumerate_outcomes(committed_prefix(pair, shape, without_replacement, depth))
    expected = target_sequences(pair.target, depth)
    for sequence in set(got) | set(expected):
        assert got.get(sequence, 0.0) == pytest.approx(expected.get(sequence, 0.0), abs=1e-6), sequence
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-6)


def test_identical_draft_is_always_accepted_without_nans():
    pair = PAIRS["identical"]
    probs = pair.draft[ROOT_TOKEN].float()
    for first, second in itertools.product(range(VOCAB), range(VOCAB)):
        tree = TokenTree.chain([first, second], torch.stack([probs, pair.draft[first].float()]))
        result = accept_sampled(tree, pair.target[[ROOT_TOKEN, first, second]].float(), torch.Generator())
        assert result.accepted_nodes == (0, 1)
        assert 0 <= result.next_token < VOCAB


def test_disjoint_draft_is_never_accepted():
    pair = PAIRS["disjoint"]
    generator = torch.Generator().manual_seed(0)
    for first in (2, 3):
        tree = TokenTree.chain([first], pair.draft[ROOT_TOKEN].float()[None])
        result = accept_sampled(tree, pair.target[[ROOT_TOKEN, first]].float(), generator)
        assert result.accepted_nodes == () and result.next_token in (0, 1)


def test_top_p_that_cuts_the_draft_token_rejects_it():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    target = logits_to_probs(logits, DecodingParams(temperature=1.0, top_p=0.5))
    draft = logits_to_probs(torch.tensor([2.9, 3.0, 0.0, -1.0]), DecodingParams(temperature=1.0, top_p=0.5))
    assert target[1] == 0 and draft[1] == 1  # the draft's only token lies outside the target's nucleus
    result = accept_sampled(TokenTree.chain([1], draft[None]), torch.stack([target, target]), torch.Generator())
    assert result.accepted_nodes == () and result.next_token == 0


def test_without_tokens_has_nothing_left_after_top_k_1():
    one_hot = logits_to_probs(torch.tensor([0.0, 2.0, 1.0]), DecodingParams(temperature=1.0, top_k=1))
    assert one_hot.tolist() == [0, 1, 0]
    assert without_tokens(one_hot, [1]) is None


def test_drafter_seed_is_derived_not_shared():
    assert derived_seed(5, "draft") != 5 and derived_seed(5, "draft") != derived_seed(6, "draft")
    assert derived_seed(5, "draft") == derived_seed(5, "draft") and derived_seed(None, "draft") is None


# ─────────────────────────── seeded sampling: the exponential race ───────────────────────────

def test_the_race_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    draws = 20_000
    counts = torch.bincount(torch.stack([race(probs, race_noise(seed, 7, 5)) for seed in range(draws)]), minlength=5)
    assert counts[4] == 0  # a token without probability never wins
    assert (counts / draws - probs).abs().sum() / 2 < 0.01


def test_race_noise_depends_on_the_seed_and_the_position_only():
    assert torch.equal(race_noise(3, 10, 50), race_noise(3, 10, 50))
    assert torch.equal(race_noise(3, 10, 50), race_noise(3, 10, 80)[:50])  # a padded vocabulary: same noise
    assert not torch.equal(race_noise(3, 10, 50), race_noise(3, 11, 50))
    assert not torch.equal(race_noise(3, 10, 50), race_noise(4, 10, 50))
    assert torch.equal(race_noise_rows(3, 10, 2, 50), torch.stack([race_noise(3, 10, 50), race_noise(3, 11, 50)]))


def test_the_seeded_rule_commits_the_races_winners_whatever_the_tree():
    generator = torch.Generator().manual_seed(0)
    noise = race_noise_rows(9, 100, 4, VOCAB)
    for _ in range(200):  # random trees of up to 3 levels, target distributions per node
        parents = [ROOT]
        for node in range(1, int(torch.randint(1, 7, (), generator=generator))):
            parents.append(int(torch.randint(-1, node, (), generator=generator)))
        tokens = torch.randint(0, VOCAB, (len(parents),), generator=generator).tolist()
        tree = TokenTree(tuple(tokens), tuple(parents))
        if max(tree.depths()) > 3 or len({(p, t) for p, t in zip(parents, tokens)}) < len(parents):
            continue  # deeper than the noise rows, or repeated siblings
        probs = torch.softmax(torch.randn(len(tree) + 1, VOCAB, generator=generator), dim=-1)
        result = accept_seeded(tree, probs, noise)
        depths = [0, *tree.depths()]
        node = ROOT
        for accepted in result.accepted_nodes:  # each accepted node is the race's winner below its parent
            assert tree.parents[accepted] == node
            assert tree.token_ids[accepted] == int(race(probs[node + 1], noise[depths[node + 1]]))
            node = accepted
        winner = int(race(probs[node + 1], noise[depths[node + 1]]))
        assert result.next_token == winner  # the next token is the race's winner after the path...
        assert winner not in [tree.token_ids[child] for child in tree.children(node)]  # ...which the tree lacks


# ─────────────────────────── through the whole stack ───────────────────────────

SAMPLING = DecodingParams(temperature=1.0, top_k=3)
PROMPT = (1, 5, 9, 20)
REPEATING_PROMPT = (1, 8, 15, 18, 90, 21, 15)  # after "15 18" the drafter mixes in a copy of 90, which the draft alone misses
LENGTH = 3


@pytest.fixture(scope="module")
def sampling_services(tmp_path_factory):
    """A tiny Llama target and a clearly different draft (so rejections and corrections are frequent)."""
    root = tmp_path_factory.mktemp("sampling-pair")
    target = build_model("llama")
    draft = perturbed_copy(target, 0.3)
    tokenizer = word_tokenizer()
    for model, name in ((target, "target"), (draft, "draft")):
        model.generation_config.eos_token_id = 2
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with running_pair(root / "target", root / "draft") as services:
        yield services, target


def exact_target_distribution(target, prompt, params, length) -> dict:
    """{first ``length`` tokens: probability} for the target alone under ``params``."""
    out = {}

    def walk(sequence, probability):
        if len(sequence) == len(prompt) + length:
            out[tuple(sequence[len(prompt):])] = probability
            return
        with torch.inference_mode():
            logits = target(input_ids=torch.tensor([sequence])).logits[0, -1]
        probs = logits_to_probs(logits, params)
        for token in torch.nonzero(probs).flatten().tolist():
            walk(sequence + [token], probability * float(probs[token]))

    walk(list(prompt), 1.0)
    return out


def generate(services, seed, max_branches, params=SAMPLING, length=LENGTH, prompt=PROMPT, budget=4):
    decoding = DecodingParams(params.temperature, params.top_k, params.top_p, seed)
    request = GenerationRequest(prompt_ids=prompt, decoding=decoding,
                                stopping=StoppingParams(max_new_tokens=length, ignore_eos=True))
    with grpc.insecure_channel(services.draft_addr) as channel:
        return Orchestrator(channel, timeout_s=60).generate(request, FixedBudget(budget, max_branches))


def total_variation(counts: dict, total: int, exact: dict) -> float:
    return 0.5 * sum(abs(counts.get(key, 0) / total - exact.get(key, 0.0)) for key in set(counts) | set(exact))


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
@pytest.mark.parametrize(("max_branches", "prompt"), [(1, PROMPT), (3, PROMPT), (3, REPEATING_PROMPT)],
                         ids=["chains", "trees", "trees-copying-context"])
def test_whole_stack_samples_the_targets_distribution(sampling_services, max_branches, prompt, seeded):
    services, target = sampling_services
    exact = exact_target_distribution(target, prompt, SAMPLING, LENGTH)
    counts: dict = {}
    distances = {}
    rounds = accepted = drafted = 0
    for sample in range(1, 801):  # unseeded: speculative sampling's own draws; seeded: one seed per sample
        result = generate(services, seed=sample if seeded else None, max_branches=max_branches, prompt=prompt)
        key = tuple(result.token_ids)
        counts[key] = counts.get(key, 0) + 1
        rounds += result.server_stats.rounds
        accepted += result.server_stats.accepted_tokens
        drafted += result.server_stats.drafted_tokens
        if sample in (50, 200, 800):
            distances[sample] = total_variation(counts, sample, exact)
    assert 0 < accepted < drafted  # both acceptances and rejections happened
    assert distances[800] < distances[50]
    assert distances[800] < 0.08, distances


@pytest.mark.parametrize(("budget", "max_branches"), [(0, 1), (1, 1), (4, 1), (4, 3), (7, 2)])
def test_a_seeded_answer_is_the_targets_own_whatever_is_drafted(sampling_services, budget, max_branches):
    services, target = sampling_services
    answers = set()
    for seed in (7, 8, 9):
        result = generate(services, seed=seed, max_branches=max_branches, length=24, budget=budget)
        assert result.token_ids == reference_seeded(target, list(PROMPT), 24, replace(SAMPLING, seed=seed))
        answers.add(tuple(result.token_ids))
    assert len(answers) > 1  # and the seed matters


def test_top_k_1_sampling_with_trees_is_the_targets_greedy_output(sampling_services):
    services, target = sampling_services
    params = DecodingParams(temperature=0.8, top_k=1)
    result = generate(services, seed=3, max_branches=3, params=params, length=20)
    assert result.token_ids == reference_greedy(target, list(PROMPT), 20, eos_token_id=None)
