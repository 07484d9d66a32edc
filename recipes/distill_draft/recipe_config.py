"""The recipe's config: one frozen dataclass per section of a ``config*.json`` file, checked when it is read.

Unknown keys, missing required keys and values of the wrong type are errors naming the key and the file
(``typed_json``). ``--set key.sub=value`` overrides one entry of a loaded config; the value is parsed as JSON
when it can be, and the result is checked like a file. Paths in a config are relative to the repository
root (``repo_path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from recipes.distill_draft.typed_json import ConfigError, from_json, to_json

REPO_ROOT = Path(__file__).resolve().parents[2]

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class SelfPromptConfig:
    """Sampling the prompts the target writes itself (``self_prompts.write_prompts``)."""

    batch_size: int  # user turns sampled side by side
    max_tokens: int  # a turn that has not ended after this many tokens is dropped
    temperature: float
    top_p: float
    exclude_prompt_files: tuple[str, ...] = ()  # other runs' self_written_prompts.json: new prompts differ from them


@dataclass(frozen=True)
class DataConfig:
    """The generate stage: which prompts, and how the target answers them."""

    num_prompts: int  # training prompts
    prompt_seed: int  # the template bank's seed
    batch_size: int  # prompts the target answers side by side
    max_new_tokens: int
    sampled_batch_fraction: float  # the share of training batches answered by sampling; the rest greedily
    temperature: float  # of the sampled batches
    teacher_dtype: Dtype
    teacher_top_k: int  # target logits kept at every answer position: the distillation signal
    num_validation_prompts: int = 0  # answered greedily, drawn with the training prompts and distinct from them
    sort_window_batches: int = 0  # prompts are sorted by length within windows of this many batches; 0: all
    time_budget_s: float | None = None  # the training answers stop when it runs out
    max_batches: int | None = None  # at most this many training batches
    prompt_source: Literal["bank", "self"] = "bank"  # the template bank, or prompts the target writes
    self_prompts: SelfPromptConfig | None = None  # needed with prompt_source "self"

    def __post_init__(self):
        if self.prompt_source == "self" and self.self_prompts is None:
            raise ValueError("prompt_source 'self' needs a self_prompts section")


@dataclass(frozen=True)
class DraftConfig:
    """The draft's shape (a Llama with the target's vocabulary) and how it is initialised from the target."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    next_token_prefix: str  # the context in which the target's hidden state after each token is taken
    next_token_batch: int  # tokens per forward pass when taking those states


@dataclass(frozen=True)
class TrainConfig:
    """The train stage: optimisation, its budget, and the data beyond this config's own answers."""

    epochs: int
    batch_sequences: int
    learning_rate: float  # of the transformer layers
    head_learning_rate: float
    input_embedding_learning_rate: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    hard_label_weight: float  # weight of the cross-entropy on the target's argmax, beside the soft top-k loss
    autocast_bf16: bool
    log_every: int
    candidate_negatives: int  # random output rows scored beside the teacher's top-k; 0 or less: all rows
    score_budgets: tuple[int, ...] = (2, 4, 6, 8)  # draft budgets at which validation counts committed tokens
    time_budget_s: float | None = None  # the planned steps shrink to fit it
    max_steps: int | None = None
    init_from: str | None = None  # a trained draft's folder to fine-tune; unset: a new draft
    extra_shard_dirs: tuple[str, ...] = ()  # other configs' answer shards, trained on as well
    validation_shard_dir: str | None = None  # unset: this config's own validation answers


@dataclass(frozen=True)
class ExportConfig:
    """The export stage: the draft's shipped dtype and the largest weight file it writes."""

    dtype: Dtype
    max_shard_size: str = "50GB"


@dataclass(frozen=True)
class RecipeConfig:
    """One run of the recipe: its seed and folders, and a section per stage (the draft's shape is shared)."""

    seed: int
    threads: int  # torch threads
    cache_dir: str  # answers, next-token states and training runs
    output_dir: str  # where the export stage writes the draft
    heldout_prompts: str  # the benchmark prompts no training prompt may overlap
    data: DataConfig
    draft: DraftConfig
    train: TrainConfig
    export: ExportConfig
    device: str = "cpu"  # a torch device, or "auto": CUDA when there is one
    run_name: str = "default"  # the training run's folder; for export, "best" picks the best-validated run


def load_config(path: Path, overrides: list[str] = ()) -> RecipeConfig:
    """The config in ``path`` with the ``--set`` ``overrides`` applied in order; ConfigError if any is wrong."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from exc
    config = from_json(RecipeConfig, raw, str(path))
    for item in overrides:
        config = apply_override(config, item)
    return config


def apply_override(config: RecipeConfig, item: str) -> RecipeConfig:
    """``config`` with ``a.b.c=value`` set; ``value`` is parsed as JSON when it can be, else taken as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    *parents, leaf = key.split(".")
    tree = to_json(config)
    node = tree
    for name in parents:
        if not isinstance(node.get(name), dict):
            raise ConfigError(f"--set {item}: no config section {name!r}")
        node = node[name]
    try:
        node[leaf] = json.loads(raw)
    except json.JSONDecodeError:
        node[leaf] = raw
    return from_json(RecipeConfig, tree, f"--set {item}")


def repo_path(value: str) -> Path:
    """A config path: absolute as given, else relative to the repository root."""
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path
