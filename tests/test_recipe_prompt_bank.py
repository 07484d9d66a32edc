"""The draft recipe's template prompt bank: a seed always gives the same prompts, every family of request is
kept, fields are filled as the data file promises, and no prompt touches the held-out benchmark."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from duo.common.prompt_sets import read_prompt_file

from recipes.distill_draft.heldout_overlap import assert_disjoint
from recipes.distill_draft.prompt_bank import Family, PromptBank, build_prompts, load_bank

HELDOUT = Path(__file__).resolve().parents[1] / "benchmarks/prompts/heldout_chat.jsonl"


def test_seed_zero_gives_these_prompts_on_every_machine_and_run():
    assert build_prompts(5, seed=0) == [
        'Translate this sentence into French: "the meeting have been moved to tomorrow afternoon"',
        "Make a table comparing fiction and non-fiction.",
        "Write a sad story about a brave firefighter who loses something precious.",
        "Explain a memory leak with a short code example.",
        "Give a short explanation of composting.",
    ]


def test_the_bank_is_deterministic_distinct_and_disjoint_from_the_held_out_prompts():
    heldout = read_prompt_file(HELDOUT)
    prompts = build_prompts(20000, 1234)
    assert prompts == build_prompts(20000, 1234)
    assert prompts[:5] != build_prompts(5, 4321), "another seed, other prompts"
    assert len(set(prompts)) == len(prompts)
    assert_disjoint(prompts, heldout)


def test_every_family_of_request_is_kept_and_every_template_renders():
    bank = load_bank()
    assert {family.name for family in bank.families} == {
        "question", "explanation", "definition", "list", "summary", "comparison", "advice", "ideas", "story",
        "poem", "code", "code_concept", "sql_shell", "math", "writing", "product", "cooking", "travel",
        "troubleshooting", "sentence", "word", "naming", "fact", "passage", "riddle", "pros_cons"}
    rng = random.Random(0)
    for family in bank.families:
        assert family.weight > 0 and family.templates, family.name
        for template in family.templates:
            prompt = bank.render(template, rng)
            assert "{" not in prompt and "}" not in prompt, (family.name, template)
            assert prompt[0].isupper() or not prompt[0].isalpha(), prompt


def test_fields_of_one_pool_differ_and_table_fields_are_drawn_together():
    pairs = [{"thing": f"thing {i}", "symptom": f"symptom {i}"} for i in range(5)]
    bank = PromptBank(
        families=(Family("test", 1, ("{animal} and {animal2}",)),),
        pools={"animal": ["cat", "dog"], "trouble": pairs, "small": range(1, 3)},
    )
    rng = random.Random(0)
    for _ in range(20):
        assert bank.render("{animal} and {animal2}", rng) in ("Cat and dog", "Dog and cat")
        assert bank.render("{small} {small2}", rng) in ("1 2", "2 1")
        thing, symptom = bank.render("{trouble[thing]}/{trouble[symptom]}", rng).split("/")
        assert thing.lower().split()[-1] == symptom.split()[-1]


def test_a_template_naming_no_word_list_is_refused_when_the_bank_is_built():
    with pytest.raises(ValueError, match="colour"):
        PromptBank(families=(Family("test", 1, ("Paint it {colour}.",)),), pools={"color": ["red"]})


def test_a_bank_too_small_for_the_count_says_so_instead_of_looping():
    bank = PromptBank(families=(Family("test", 1, ("Hello {name}.",)),), pools={"name": ["Ann", "Bo"]})
    assert sorted(build_prompts(2, 0, bank)) == ["Hello Ann.", "Hello Bo."]
    with pytest.raises(ValueError, match="only 2"):
        build_prompts(3, 0, bank)


def test_the_held_out_check_sees_through_case_and_shared_runs_of_words():
    heldout = ["Give a step-by-step guide to changing a flat bicycle tyre."]
    assert_disjoint(["Give a guide to changing a tyre."], heldout)
    with pytest.raises(AssertionError, match="also a training prompt"):
        assert_disjoint([heldout[0].upper()], heldout)
    with pytest.raises(AssertionError, match="overlaps"):
        assert_disjoint(["Please, give a step-by-step guide to changing a flat car tyre"], heldout)
