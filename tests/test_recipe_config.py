"""The draft recipe's config is checked when it is read: every shipped file fits the schema, and a wrong key,
a wrong type or a missing key, in a file or a --set override, stops the run with the key and its source named.
The shipped configs also agree with each other and with the shipped draft where the recipe's chain needs it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from recipes.distill_draft.recipe_config import RecipeConfig, apply_override, load_config
from recipes.distill_draft.typed_json import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes/distill_draft"
SHIPPED_CONFIGS = sorted(RECIPE.glob("config*.json"))


def test_the_recipe_ships_seven_configs():
    assert len(SHIPPED_CONFIGS) == 7, [path.name for path in SHIPPED_CONFIGS]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads_under_the_schema(path):
    config = load_config(path)
    assert isinstance(config, RecipeConfig)
    assert config.draft.tie_word_embeddings is False
    assert config.data.num_prompts > 0
    assert isinstance(config.train.learning_rate, float)
    assert isinstance(config.train.score_budgets, tuple)


def write_config(tmp_path: Path, edit) -> Path:
    """config.json with ``edit`` applied to its parsed JSON, written to a file of its own."""
    raw = json.loads((RECIPE / "config.json").read_text())
    edit(raw)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["data"].update(num_promts=10), "unknown key data.num_promts"),
    (lambda raw: raw.update(comment="a note"), "unknown key comment"),
    (lambda raw: raw["train"].pop("epochs"), "missing key train.epochs"),
    (lambda raw: raw.pop("export"), "missing key export"),
    (lambda raw: raw["data"].update(batch_size="64"), "data.batch_size must be int, got str"),
    (lambda raw: raw["data"].update(batch_size=64.0), "data.batch_size must be int, got float"),
    (lambda raw: raw["draft"].update(num_hidden_layers=True), "draft.num_hidden_layers must be int, got bool"),
    (lambda raw: raw["draft"].update(tie_word_embeddings=0), "draft.tie_word_embeddings must be bool"),
    (lambda raw: raw["train"].update(score_budgets=[2, "4"]), r"train.score_budgets\[1\] must be int"),
    (lambda raw: raw["train"].update(extra_shard_dirs="shards"), "train.extra_shard_dirs must be a list"),
    (lambda raw: raw.update(draft=[]), "draft must be a JSON object"),
    (lambda raw: raw["data"].update(teacher_dtype="fp8"), "data.teacher_dtype must be one of"),
    (lambda raw: raw["data"].update(prompt_source="hub"), "data.prompt_source must be one of 'bank', 'self'"),
    (lambda raw: raw["data"].update(prompt_source="self"), "data: prompt_source 'self' needs a self_prompts"),
    (lambda raw: raw["data"].update(prompt_source="self", self_prompts={"batch_size": 8}),
     "missing key data.self_prompts.max_tokens"),
])
def test_a_config_that_does_not_fit_the_schema_is_refused_naming_the_key_and_file(tmp_path, edit, message):
    path = write_config(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as refused:
        load_config(path)
    assert str(refused.value).startswith(str(path))


def test_optional_keys_take_their_defaults_and_whole_numbers_serve_as_floats(tmp_path):
    def edit(raw):
        raw.pop("run_name")
        raw["data"].pop("sort_window_batches")
        raw["train"]["learning_rate"] = 1

    config = load_config(write_config(tmp_path, edit))
    assert config.run_name == "default" and config.data.sort_window_batches == 0
    assert config.data.time_budget_s is None and config.train.extra_shard_dirs == ()
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)


def test_the_config_is_frozen():
    config = load_config(RECIPE / "config.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.data.num_prompts = 1  # type: ignore[misc]


def test_set_overrides_nested_entries_and_parses_json_values():
    config = load_config(RECIPE / "config.json", ["draft.num_hidden_layers=4", "train.time_budget_s=null",
                                                  "run_name=layers4b", "train.time_budget_s=90"])
    assert config.draft.num_hidden_layers == 4
    assert config.train.time_budget_s == 90.0
    assert config.run_name == "layers4b"
    assert config.data == load_config(RECIPE / "config.json").data, "other entries untouched"
    with_budgets = apply_override(config, "train.score_budgets=[1, 3]")
    assert with_budgets.train.score_budgets == (1, 3) and config.train.score_budgets == (2, 4, 6, 8)


@pytest.mark.parametrize("item, message", [
    ("no_equals_sign", "expects key.sub=value"),
    ("=4", "expects key.sub=value"),
    ("missing.section=1", "no config section 'missing'"),
    ("train.epoch=3", "--set train.epoch=3: unknown key train.epoch"),
    ("train.epochs=three", "--set train.epochs=three: train.epochs must be int, got str"),
    ("draft=4", "--set draft=4: draft must be a JSON object"),
])
def test_set_goes_through_the_same_checks_as_the_file(item, message):
    config = load_config(RECIPE / "config.json")
    with pytest.raises(ConfigError, match=message):
        apply_override(config, item)


def test_shipped_configs_chain_into_the_shipped_draft():
    """Each fine-tune starts from the export of the config before it, and the GPU-side pair (a new draft and a
    fine-tune) train and validate on the same answers, to prompts new to both CPU fine-tunes."""
    gpu = load_config(RECIPE / "config_gpu.json")
    first_cpu = load_config(RECIPE / "config_self_cpu.json")
    second_cpu = load_config(RECIPE / "config_self2_cpu.json")
    template = load_config(RECIPE / "config_gpu_template.json")
    scratch = load_config(RECIPE / "config_gpu_self.json")
    fine_tune = load_config(RECIPE / "config_gpu_finetune.json")
    assert first_cpu.train.init_from == gpu.output_dir
    assert second_cpu.train.init_from == first_cpu.output_dir
    assert fine_tune.train.init_from == second_cpu.output_dir
    assert second_cpu.train.validation_shard_dir == first_cpu.cache_dir + "/validation"
    assert second_cpu.data.self_prompts.exclude_prompt_files == (first_cpu.cache_dir + "/self_written_prompts.json",)
    assert fine_tune.data == scratch.data and fine_tune.cache_dir == scratch.cache_dir
    assert fine_tune.train.extra_shard_dirs == scratch.train.extra_shard_dirs == (template.cache_dir + "/shards",)
    assert fine_tune.data.self_prompts.exclude_prompt_files == (
        first_cpu.cache_dir + "/self_written_prompts.json", second_cpu.cache_dir + "/self_written_prompts.json")
    assert fine_tune.run_name != scratch.run_name and fine_tune.output_dir != scratch.output_dir
    shipped = json.loads((REPO_ROOT / "draft_service/default_model/config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
        for config in (gpu, first_cpu, second_cpu, fine_tune):
            assert getattr(config.draft, key) == shipped[key], key
