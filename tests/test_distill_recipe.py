"""The draft-distillation recipe's pure parts: batching, the training schedule, the self-written prompts, the
fine-tuning start, and the validation score, which must equal an exact simulation of greedy speculative
decoding. The config and the template prompt bank have their own tests (tests/test_recipe_*.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from benchmarks import draft_quality
from duo.common.prompt_sets import read_prompt_file

from recipes.distill_draft import self_prompts
from recipes.distill_draft.draft_init import initial_draft
from recipes.distill_draft.recipe_config import load_config
from recipes.distill_draft.runtime import Deadline
from recipes.distill_draft.teacher_answers import length_sorted_batches, split_prompts
from recipes.distill_draft.training import planned_steps
from recipes.distill_draft.validation import committed_per_round, validation_scores
from tests.tiny_models import build_model, perturbed_copy

REPO_ROOT = Path(__file__).resolve().parents[1]
HELDOUT = REPO_ROOT / "benchmarks/prompts/heldout_chat.jsonl"
CPU_CONFIG = load_config(REPO_ROOT / "recipes/distill_draft/config.json")


def test_length_sorted_batches_sort_inside_windows_only():
    prompts = [[0] * n for n in (5, 1, 4, 2, 9, 7, 8, 6)]
    batches = length_sorted_batches(prompts, batch_size=2, sort_window=2)
    assert [[len(p) for p in b] for b in batches] == [[1, 2], [4, 5], [6, 7], [8, 9]]
    whole = length_sorted_batches(prompts, batch_size=3, sort_window=0)
    assert [[len(p) for p in b] for b in whole] == [[1, 2, 4], [5, 6, 7], [8, 9]]
    assert length_sorted_batches([], batch_size=3, sort_window=0) == []  # no validation prompts


def test_planned_steps_respects_epochs_max_steps_and_the_time_budget():
    train = dataclasses.replace(CPU_CONFIG.train, warmup_steps=10)
    unlimited = Deadline(None)
    assert planned_steps(train, 500, 0.1, unlimited) == 500
    assert planned_steps(dataclasses.replace(train, max_steps=200), 500, 0.1, unlimited) == 200
    budget = Deadline(100.0)
    assert 900 < planned_steps(train, 5000, 0.1, budget) <= 1000
    # planned again later: the steps done plus what the rest of the budget fits, never fewer than done
    assert 1100 < planned_steps(train, 5000, 0.1, budget, steps_done=200) <= 1200
    assert planned_steps(train, 5000, 1e6, budget, steps_done=200) == 200


@pytest.mark.parametrize("matches, budget, expected", [
    ([True] * 10, 4, (10, 2)),      # rounds of 4 accepted + 1 target token
    ([False] * 6, 4, (6, 6)),       # nothing accepted: one token per round
    ([True, False, True, True, True, False, True], 8, (7, 3)),
    ([True] * 5, 0, (5, 5)),        # no drafting at all
])
def test_committed_per_round_counts_rounds_of_greedy_chain_speculation(matches, budget, expected):
    assert committed_per_round(matches, budget) == expected


def test_validation_scores_equal_an_exact_simulation_of_speculative_decoding():
    """Teacher-forced matches give the same rounds as drafting with a KV cache and verifying, budget by budget."""
    target = build_model("llama", seed=3)
    draft = perturbed_copy(target, noise=0.03, seed=4)
    generator = torch.Generator().manual_seed(5)
    records, simulated = [], {k: [0, 0] for k in (1, 2, 4, 6)}
    for _ in range(4):
        prompt = torch.randint(3, 96, (6,), generator=generator).tolist()
        answer, _ = draft_quality.greedy_decode(target, prompt, max_new_tokens=40, eos_id=-1)
        records.append({"input_ids": torch.tensor(prompt + answer, dtype=torch.int32), "prompt_len": len(prompt)})
        for k, totals in simulated.items():
            tokens, rounds = draft_quality.simulate_speculative(draft, prompt, answer, k)
            totals[0] += tokens
            totals[1] += rounds
    scores = validation_scores(draft, records, list(simulated))
    assert scores["validation_tokens"] == 160
    assert 0.2 < scores["agreement"] < 1.0, "the pair must both accept and reject for this test to mean anything"
    for k, (tokens, rounds) in simulated.items():
        assert scores["committed_per_round"][str(k)] == pytest.approx(tokens / rounds), k


def test_self_prompt_filter_keeps_new_prompts_of_sensible_length_and_nothing_from_the_held_out_set():
    heldout = ["Why did the Titanic sink?", "Give a step-by-step guide to changing a flat bicycle tyre."]
    keep = self_prompts.PromptFilter(heldout)
    assert keep.accept("How do I keep basil alive on a windowsill?")
    assert not keep.accept("how do I keep basil alive on a windowsill"), "a duplicate up to case and punctuation"
    assert not keep.accept("Hello there"), "too short"
    assert not keep.accept(" ".join(["word"] * (self_prompts.MAX_WORDS + 1))), "too long"
    assert not keep.accept("WHY did the Titanic sink"), "equals a held-out prompt"
    assert not keep.accept("Please give a step-by-step guide to changing a flat tyre on a car."), "shares six words"
    assert keep.accept("Give a short guide to fixing a bike chain.")


def test_self_prompt_filter_rejects_an_earlier_rounds_prompts():
    keep = self_prompts.PromptFilter([], known_prompts=["How do I keep basil alive on a windowsill?"])
    assert not keep.accept("How do I keep basil alive on a windowsill"), "written in an earlier round"
    assert keep.accept("How do I keep mint alive on a windowsill?")


def test_top_p_sampling_draws_only_from_the_nucleus_in_proportion():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens = self_prompts.sample_top_p(logits, temperature=1.0, top_p=0.6, generator=generator)
    counts = torch.bincount(tokens, minlength=3).tolist()
    assert counts[2] == 0, "the third token lies outside the 0.6 nucleus"
    assert abs(counts[0] / 4000 - 0.625) < 0.03
    greedy = self_prompts.sample_top_p(logits[:5], temperature=1.0, top_p=0.0, generator=generator)
    assert greedy.tolist() == [0] * 5


class ScriptedTurns:
    """A stand-in target whose row r writes tokens 10, 11, ... and ends its turn after r + 1 of them;
    the last row never ends."""

    device = torch.device("cpu")

    def __init__(self, rows: int, end_id: int, vocab: int = 64):
        self.rows, self.end_id, self.vocab, self.step = rows, end_id, vocab, 0

    def __call__(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=None):
        logits = torch.full((self.rows, input_ids.shape[1], self.vocab), -1e9)
        for row in range(self.rows):
            ends = row < self.rows - 1 and self.step == row + 1
            logits[row, -1, self.end_id if ends else 10 + self.step] = 0.0
        self.step += 1
        return type("Output", (), {"logits": logits})()


def test_sampled_user_turns_stop_at_the_end_token_and_drop_unfinished_turns():
    rows, end_id = 4, 3
    turns = self_prompts.sample_user_turns(ScriptedTurns(rows, end_id), [1, 5, 6], rows, max_tokens=6,
                                           temperature=1.0, top_p=0.9, end_id=end_id,
                                           generator=torch.Generator().manual_seed(0))
    assert turns == [[10], [10, 11], [10, 11, 12], None]


def test_user_turn_prefix_is_the_chat_template_up_to_the_users_words():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "draft_service/default_model")
    prefix = tokenizer.decode(self_prompts.user_turn_prefix(tokenizer))
    full = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False)
    assert prefix.endswith("<|im_start|>user\n")
    assert full.startswith(prefix + "Hi there")


def test_fine_tuning_starts_from_the_given_draft_and_refuses_one_of_another_shape(tmp_path):
    model = build_model("llama", seed=7)
    model.save_pretrained(tmp_path / "draft")
    model.config.save_pretrained(tmp_path / "target")
    shape = {field.name: getattr(model.config, field.name) for field in dataclasses.fields(CPU_CONFIG.draft)
             if hasattr(model.config, field.name)}  # next_token_* only build a new draft: fine-tuning ignores them
    cfg = dataclasses.replace(CPU_CONFIG, draft=dataclasses.replace(CPU_CONFIG.draft, **shape),
                              train=dataclasses.replace(CPU_CONFIG.train, init_from=str(tmp_path / "draft")))
    draft = initial_draft(cfg, tmp_path / "target")
    assert torch.equal(draft.lm_head.weight, model.lm_head.weight)
    deeper = dataclasses.replace(cfg, draft=dataclasses.replace(cfg.draft, num_hidden_layers=4))
    with pytest.raises(SystemExit, match="num_hidden_layers"):
        initial_draft(deeper, tmp_path / "target")


def test_self_written_prompts_are_read_from_the_cache_and_split_like_bank_prompts(tmp_path):
    heldout = read_prompt_file(HELDOUT)
    written = [f"Can you suggest a name for my pet number {i}?" for i in range(6)]
    (tmp_path / "self_written_prompts.json").write_text(json.dumps(written))
    cfg = load_config(REPO_ROOT / "recipes/distill_draft/config_self_cpu.json",
                      [f"cache_dir={json.dumps(str(tmp_path))}", "data.num_prompts=4", "data.num_validation_prompts=2"])
    assert split_prompts(cfg) == (written[2:], written[:2])
    (tmp_path / "self_written_prompts.json").write_text(json.dumps(written[:5] + [heldout[3]]))
    with pytest.raises(AssertionError):
        split_prompts(cfg)
