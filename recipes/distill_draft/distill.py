"""Distil duo's default draft model from SmolLM2-135M-Instruct, on a CPU or a GPU.

Stages (run all with ``python recipes/distill_draft/distill.py``, or one with ``--stage``):

1. ``generate``: build the training and validation prompts (``prompt_bank.build_prompts``, fixed seed; or,
   with ``data.prompt_source`` "self", prompts the target writes itself: ``self_prompts.write_prompts``), check
   they are disjoint from the held-out benchmark prompts, format them with the target's chat template, and let
   the target answer them in left-padded batches (greedy and sampled batches alternate; validation answers are
   greedy). At every answer position the target's top-k next-token logits are kept as the distillation signal.
   Each batch is written as a shard under ``<cache_dir>/shards`` so the stage can resume.
2. ``train``: build a small Llama draft (same tokenizer and vocabulary, initialised from the target's output
   layer and its next-token hidden states; with ``train.init_from``, start from a trained draft instead) and
   train it with teacher forcing to match the target's next-token distribution (soft cross-entropy against the
   renormalised top-k plus a small hard-label term on the target's argmax) on the answer tokens. Then score it
   on the validation answers: per-token agreement and the tokens a greedy speculative round would commit at
   several draft budgets.
3. ``export``: write the draft in the shipped dtype with the target's tokenizer files and a generation config
   into ``output_dir`` (``config_gpu.json``, ``config_self_cpu.json`` and ``config_self2_cpu.json``: the
   folders the next step fine-tunes from; ``config_gpu_finetune.json``: a folder on the GPU machine, copied into
   ``draft_service/default_model``, the shipped draft; ``config.json``: a folder in its cache, so a CPU rebuild
   leaves the shipped draft alone).

All hyper-parameters and seeds live in a config file (``config.json``: the one-hour CPU recipe;
``config_gpu.json``: the same recipe scaled up for one GPU; ``config_self_cpu.json``: a CPU fine-tune of the
GPU-built draft on answers to prompts the target wrote; ``config_self2_cpu.json``: a second such fine-tune on
3,000 more; ``config_gpu_template.json`` and ``config_gpu_self.json``: step 4's answers to template and
self-written prompts on one GPU, and a new draft trained on both; ``config_gpu_finetune.json``: step 3's draft
fine-tuned on them, the shipped draft; ``gpu_both_sources.sh`` runs step 4).
Paths in it are relative to the repository root.
``--set key.sub=value`` overrides one entry (the value is parsed as JSON when it can be). The target folder
comes from ``duo_common.default_models.default_target_dir()``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from duo_common.default_models import default_target_dir  # noqa: E402
from prompt_bank import assert_disjoint, build_prompts  # noqa: E402
from self_prompts import write_prompts  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

log = logging.getLogger("distill")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# configuration and helpers


def load_config(path: Path, overrides: list[str] = ()) -> dict:
    with open(path) as f:
        cfg = json.load(f)
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested config; ``value`` is parsed as JSON when it can be."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set expects key.sub=value, got {item!r}")
    *parents, leaf = key.split(".")
    node = cfg
    for name in parents:
        if not isinstance(node.get(name), dict):
            raise SystemExit(f"--set {item!r}: no config section {name!r}")
        node = node[name]
    try:
        node[leaf] = json.loads(raw)
    except json.JSONDecodeError:
        node[leaf] = raw


def repo_path(value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def run_dir(cfg: dict) -> Path:
    """Where the train stage writes this run's checkpoint and validation scores.

    ``run_name`` "best" (for export) names the finished run with the most tokens committed per round on the
    validation answers, at its best budget.
    """
    runs = repo_path(cfg["cache_dir"]) / "runs"
    name = cfg.get("run_name", "default")
    if name != "best":
        return runs / name
    scored = {path.parent: json.loads(path.read_text()) for path in runs.glob("*/validation.json")}
    if not scored:
        raise SystemExit(f"no finished runs under {runs}")
    best = max(scored, key=lambda run: max(scored[run]["committed_per_round"].values()))
    log.info("best run by validation: %s %s", best.name, json.dumps(scored[best]["committed_per_round"]))
    return best


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def read_heldout_prompts(path: Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a single-turn chat, exactly as inference formats it."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


class Deadline:
    """A wall-clock budget for a stage (``None`` seconds: no budget)."""

    def __init__(self, seconds: float | None):
        self.started = time.time()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.time() - self.started

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()


# ----------------------------------------------------------------------------------------------------------
# stage 1: target-generated answers with top-k teacher logits


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_batch(target, prompt_ids: list[list[int]], data_cfg: dict, sampled: bool,
                   generator: torch.Generator, eos_id: int) -> list[dict]:
    """Answer a batch of prompts with the target; keep the top-k logits at every answer position.

    Everything stays on the target's device until the batch is done; an answer ends with (and includes)
    its first EOS, or after ``max_new_tokens`` tokens.
    """
    device = target.device
    top_k, steps = data_cfg["teacher_top_k"], data_cfg["max_new_tokens"]
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompt_ids, eos_id))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 past_key_values=cache, use_cache=True, logits_to_keep=1)
    batch = len(prompt_ids)
    tokens = torch.full((batch, steps), eos_id, dtype=torch.long, device=device)
    top_idx = torch.zeros((batch, steps, top_k), dtype=torch.int32, device=device)
    top_val = torch.zeros((batch, steps, top_k), dtype=torch.float16, device=device)
    lengths = torch.full((batch,), steps, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(steps):
        target_logits = out.logits[:, -1].float()
        values, indices = target_logits.topk(top_k, dim=-1)
        if sampled:
            target_probs = torch.softmax(target_logits / data_cfg["temperature"], dim=-1)
            next_tokens = torch.multinomial(target_probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = target_logits.argmax(-1)
        tokens[:, step] = next_tokens
        top_idx[:, step] = indices.to(torch.int32)
        top_val[:, step] = values.to(torch.float16)
        ends_here = ~finished & (next_tokens == eos_id)
        lengths[ends_here] = step + 1
        finished |= ends_here
        if step == steps - 1 or (step % 8 == 7 and bool(finished.all())):
            break
        attention_mask = torch.cat([attention_mask, torch.ones((batch, 1), dtype=torch.long, device=device)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = target(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True)
    tokens, top_idx, top_val, lengths = tokens.cpu(), top_idx.cpu(), top_val.cpu(), lengths.tolist()
    return [
        {
            "input_ids": torch.tensor(prompt_ids[row] + tokens[row, :lengths[row]].tolist(), dtype=torch.int32),
            "prompt_len": len(prompt_ids[row]),
            "topk_idx": top_idx[row, :lengths[row]].clone(),
            "topk_logit": top_val[row, :lengths[row]].clone(),
            "sampled": sampled,
        }
        for row in range(batch)
    ]


def length_sorted_batches(prompt_ids: list[list[int]], batch_size: int, sort_window: int) -> list[list[list[int]]]:
    """Batches in prompt order, sorted by length inside windows of ``sort_window`` batches to limit padding.

    A window of 0 sorts the whole list. Keeping the prompts' (shuffled) order across windows means a stage
    stopped by its time budget still covers every kind of prompt.
    """
    window = max(1, len(prompt_ids)) if sort_window <= 0 else sort_window * batch_size
    batches: list[list[list[int]]] = []
    for start in range(0, len(prompt_ids), window):
        block = sorted(prompt_ids[start:start + window], key=len)
        batches.extend(block[i:i + batch_size] for i in range(0, len(block), batch_size))
    return batches


def split_prompts(cfg: dict, target=None, tokenizer=None) -> tuple[list[str], list[str]]:
    """(training, validation) prompts, drawn together so they are distinct, both disjoint from the held-out set.

    ``data.prompt_source`` "bank" (the default) draws them from the template bank; "self" has the target write
    them (``self_prompts.write_prompts``; needs ``target`` and ``tokenizer``), cached in the cache folder.
    """
    data_cfg = cfg["data"]
    validation_count = data_cfg.get("num_validation_prompts", 0)
    count = data_cfg["num_prompts"] + validation_count
    heldout = read_heldout_prompts(repo_path(cfg["heldout_prompts"]))
    source = data_cfg.get("prompt_source", "bank")
    if source == "bank":
        prompts = build_prompts(count, data_cfg["prompt_seed"])
    elif source == "self":
        prompts = cached_self_written_prompts(cfg, count, heldout, target, tokenizer)
    else:
        raise SystemExit(f"unknown data.prompt_source {source!r}: use 'bank' or 'self'")
    assert_disjoint(prompts, heldout)
    return prompts[validation_count:], prompts[:validation_count]


def cached_self_written_prompts(cfg: dict, count: int, heldout: list[str], target, tokenizer) -> list[str]:
    path = repo_path(cfg["cache_dir"]) / "self_written_prompts.json"
    if path.exists():
        prompts = json.loads(path.read_text())
        if len(prompts) >= count:
            return prompts[:count]
    settings = cfg["data"]["self_prompts"]
    known = [p for name in settings.get("exclude_prompt_files", []) for p in json.loads(repo_path(name).read_text())]
    started = time.time()
    prompts = write_prompts(target, tokenizer, count, heldout, settings, cfg["seed"], log, known_prompts=known)
    log.info("the target wrote %d prompts in %.0f s", len(prompts), time.time() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompts, indent=0))
    return prompts


def load_target(target_dir: Path, dtype: torch.dtype, device: torch.device):
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).to(device).eval()


def stage_generate(cfg: dict) -> None:
    data_cfg = cfg["data"]
    cache_dir = repo_path(cfg["cache_dir"])
    device = pick_device(cfg.get("device", "cpu"))
    target_dir = default_target_dir()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = load_target(target_dir, DTYPES[data_cfg["teacher_dtype"]], device)
    train_prompts, validation_prompts = split_prompts(cfg, target, tokenizer)
    log.info("%d training and %d validation prompts, disjoint from the held-out set", len(train_prompts),
             len(validation_prompts))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / "train_prompts.json", "w") as f:
        json.dump(train_prompts, f, indent=0)
    with open(cache_dir / "validation_prompts.json", "w") as f:
        json.dump(validation_prompts, f, indent=0)

    batch_size = data_cfg["batch_size"]
    validation_batches = length_sorted_batches([chat_ids(tokenizer, p) for p in validation_prompts], batch_size, 0)
    write_shards(target, validation_batches, cache_dir / "validation", cfg, tokenizer.eos_token_id,
                 sampled_every=0, deadline=Deadline(None))
    train_batches = length_sorted_batches([chat_ids(tokenizer, p) for p in train_prompts], batch_size,
                                          data_cfg.get("sort_window_batches", 0))
    train_batches = train_batches[:data_cfg.get("max_batches") or len(train_batches)]
    sampled_fraction = data_cfg["sampled_batch_fraction"]
    write_shards(target, train_batches, cache_dir / "shards", cfg, tokenizer.eos_token_id,
                 sampled_every=round(1 / sampled_fraction) if sampled_fraction else 0,
                 deadline=Deadline(data_cfg.get("time_budget_s")))
    if not cfg["train"].get("init_from"):
        cached_next_token_states(cfg, target_dir, tokenizer, target)  # the train stage's initialisation, once


def write_shards(target, batches: list[list[list[int]]], shard_dir: Path, cfg: dict, eos_id: int,
                 sampled_every: int, deadline: Deadline) -> None:
    """Answer each batch and save it as one shard (skipping shards that exist); stop when the budget runs out."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    slowest = 0.0
    for index, batch in enumerate(batches):
        shard_path = shard_dir / f"shard_{index:04d}.pt"
        if shard_path.exists():
            continue
        if deadline.remaining() < slowest:
            log.info("%s: time budget reached after %d of %d batches", shard_dir.name, index, len(batches))
            return
        batch_started = time.time()
        sampled = bool(sampled_every) and index % sampled_every == sampled_every - 1
        generator = torch.Generator(device=target.device).manual_seed(cfg["seed"] + index)
        records = generate_batch(target, batch, cfg["data"], sampled, generator, eos_id)
        torch.save(records, shard_path)
        slowest = max(slowest, time.time() - batch_started)
        answer_tokens = sum(len(r["topk_idx"]) for r in records)
        log.info("%s %d/%d (%s): %d answer tokens, %.0f s elapsed", shard_dir.name, index + 1, len(batches),
                 "sampled" if sampled else "greedy", answer_tokens, deadline.elapsed())


def load_shards(shard_dir: Path) -> list[dict]:
    records: list[dict] = []
    for shard_path in sorted(shard_dir.glob("shard_*.pt")):
        records.extend(torch.load(shard_path))
    return records


# ----------------------------------------------------------------------------------------------------------
# stage 2: the draft model and its training


def draft_config(target_config, draft_cfg: dict) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=draft_cfg["hidden_size"],
        intermediate_size=draft_cfg["intermediate_size"],
        num_hidden_layers=draft_cfg["num_hidden_layers"],
        num_attention_heads=draft_cfg["num_attention_heads"],
        num_key_value_heads=draft_cfg["num_key_value_heads"],
        head_dim=draft_cfg["head_dim"],
        max_position_embeddings=draft_cfg["max_position_embeddings"],
        rms_norm_eps=target_config.rms_norm_eps,
        rope_parameters=dict(target_config.rope_parameters),
        hidden_act=target_config.hidden_act,
        tie_word_embeddings=draft_cfg["tie_word_embeddings"],
        bos_token_id=target_config.bos_token_id,
        eos_token_id=target_config.eos_token_id,
        pad_token_id=target_config.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )


@torch.no_grad()
def next_token_states(target, prefix_ids: list[int], batch_size: int) -> torch.Tensor:
    """For every vocabulary token x, the target's final (normed) hidden state right after ``prefix + [x]``.

    Multiplied by the target's output head these give the target's next-token logits after x alone: its
    "bigram" knowledge of all 49,152 tokens, including the ones the generated answers never contain.
    """
    vocab, device = target.config.vocab_size, target.device
    prefix_cache = DynamicCache()
    target.model(input_ids=torch.tensor([prefix_ids], device=device).repeat(batch_size, 1),
                 past_key_values=prefix_cache, use_cache=True)
    states = torch.empty(vocab, target.config.hidden_size)
    for start in range(0, vocab, batch_size):
        tokens = torch.arange(start, start + batch_size, device=device) % vocab
        hidden = target.model(input_ids=tokens[:, None], past_key_values=copy.deepcopy(prefix_cache),
                              use_cache=True).last_hidden_state[:, -1]
        count = min(batch_size, vocab - start)
        states[start:start + count] = hidden[:count].float().cpu()
    return states


def cached_next_token_states(cfg: dict, target_dir: Path, tokenizer, target=None) -> torch.Tensor:
    """``next_token_states`` for the configured prefix, computed once per cache folder."""
    path = repo_path(cfg["cache_dir"]) / "next_token_states.pt"
    if path.exists():
        return torch.load(path)
    draft_cfg = cfg["draft"]
    prefix_ids = tokenizer(draft_cfg["next_token_prefix"], add_special_tokens=False)["input_ids"]
    if target is None:
        target = load_target(target_dir, DTYPES[cfg["data"]["teacher_dtype"]], pick_device(cfg.get("device", "cpu")))
    started = time.time()
    states = next_token_states(target, prefix_ids, draft_cfg["next_token_batch"])
    log.info("target next-token states for %d tokens in %.0f s", len(states), time.time() - started)
    torch.save(states, path)
    return states


def logit_basis(target_embedding: torch.Tensor, states: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-``width`` factorisation of the target's output layer, fitted to its real hidden states.

    The target's logits are ``h @ E.T``. With ``R`` the Cholesky factor of the hidden states' second moment,
    ``h @ E.T = (R^-1 h) @ (E R).T`` where ``R^-1 h`` is white; the top ``width`` right singular vectors ``W``
    of ``E R`` then give the best rank-``width`` approximation of the logits in the mean-square sense.
    Returns the draft's output head ``E R W`` (vocab, width) and the map ``h -> R^-1 h @ W`` as a matrix.
    (Projecting on the embedding's own top singular vectors instead loses almost all of the argmax: the
    hidden states live largely in the embedding's low-variance directions.)
    """
    second_moment = states.double().T @ states.double() / len(states)
    cholesky = torch.linalg.cholesky(second_moment)
    whitened_embedding = target_embedding.double() @ cholesky
    _, _, right_vectors = torch.linalg.svd(whitened_embedding, full_matrices=False)
    basis = right_vectors[:width].T
    to_draft = torch.linalg.solve_triangular(cholesky.T, basis, upper=True)  # R^-T W, so h @ it = (R^-1 h) W
    return (whitened_embedding @ basis).float(), to_draft.float()


def build_draft(cfg: dict, target_dir: Path) -> LlamaForCausalLM:
    """The draft, initialised from the target's output layer and its next-token hidden states.

    The output head is a rank-``hidden_size`` factorisation of the target's output layer (``logit_basis``).
    With untied embeddings each input row is the target's hidden state after the token, mapped into the
    draft's space, and the final norm is scaled to the target's logit scale, so before any training the
    draft already approximates what the target predicts from the last token alone.
    """
    draft_cfg = cfg["draft"]
    width = draft_cfg["hidden_size"]
    torch.manual_seed(cfg["seed"])
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    draft = LlamaForCausalLM(draft_config(target.config, draft_cfg))
    target_embedding = target.get_input_embeddings().weight.detach()
    states = cached_next_token_states(cfg, target_dir, AutoTokenizer.from_pretrained(target_dir))
    head, to_draft = logit_basis(target_embedding, states, width)
    draft_states = states @ to_draft
    norms = draft_states.norm(dim=1)
    row_norm = float(target_embedding.norm(dim=1).mean())
    draft.lm_head.weight.data.copy_(head)
    if not draft_cfg["tie_word_embeddings"]:
        draft.get_input_embeddings().weight.data.copy_(draft_states / norms.mean() * row_norm)
    draft.model.norm.weight.data.fill_(float(norms.mean()) / math.sqrt(width))
    return draft


def initial_draft(cfg: dict, target_dir: Path) -> LlamaForCausalLM:
    """The draft to train: a trained draft to fine-tune (``train.init_from``, a folder), or a new one."""
    init_from = cfg["train"].get("init_from")
    if not init_from:
        return build_draft(cfg, target_dir)
    draft = LlamaForCausalLM.from_pretrained(repo_path(init_from), dtype=torch.float32)
    target_vocab = AutoConfig.from_pretrained(target_dir).vocab_size
    if draft.config.vocab_size != target_vocab:
        raise SystemExit(f"train.init_from {init_from}: vocabulary {draft.config.vocab_size}, "
                         f"the target's {target_vocab}")
    mismatched = {key: (value, getattr(draft.config, key)) for key, value in cfg["draft"].items()
                  if hasattr(draft.config, key) and getattr(draft.config, key) != value}
    if mismatched:
        raise SystemExit(f"train.init_from {init_from} does not match the draft config (config, model): "
                         f"{mismatched}")
    log.info("fine-tuning the draft in %s", init_from)
    return draft


def make_batches(records: list[dict], batch_sequences: int, rng: random.Random) -> list[list[dict]]:
    """Shuffle, then group sequences of similar length to limit padding."""
    order = list(range(len(records)))
    rng.shuffle(order)
    chunk = batch_sequences * 16
    batches: list[list[dict]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start:start + chunk], key=lambda i: len(records[i]["input_ids"]))
        batches.extend([records[i] for i in block[j:j + batch_sequences]] for j in range(0, len(block), batch_sequences))
    rng.shuffle(batches)
    return batches


def collate(batch: list[dict], pad_id: int, device: torch.device) -> dict:
    """Right-padded inputs plus, per answer position, its flat index and its teacher top-k."""
    width = max(len(r["input_ids"]) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    flat_positions, top_idx, top_logit = [], [], []
    for row, record in enumerate(batch):
        length = len(record["input_ids"])
        input_ids[row, :length] = record["input_ids"].long()
        attention_mask[row, :length] = 1
        first = record["prompt_len"] - 1  # the logits at this position predict the first answer token
        count = len(record["topk_idx"])
        flat_positions.append(torch.arange(first, first + count) + row * width)
        top_idx.append(record["topk_idx"].long())
        top_logit.append(record["topk_logit"].float())
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "flat_positions": torch.cat(flat_positions),
        "top_idx": torch.cat(top_idx),
        "top_logit": torch.cat(top_logit),
    }
    return {name: tensor.to(device, non_blocking=True) for name, tensor in tensors.items()}


def candidate_tokens(top_idx: torch.Tensor, vocab_size: int, negatives: int, generator: torch.Generator) -> torch.Tensor:
    """The output rows scored this step: every token in the batch's teacher top-k plus random negatives.

    Scoring only these rows (a sampled softmax) makes a training step several times cheaper than the full
    49,152-way softmax on a CPU; the random negatives, redrawn every step, keep pushing the other tokens down.
    ``negatives <= 0`` scores the full vocabulary (what a GPU can afford).
    """
    if negatives <= 0:
        return torch.arange(vocab_size, device=top_idx.device)
    random_tokens = torch.randint(0, vocab_size, (negatives,), generator=generator).to(top_idx.device)
    return torch.unique(torch.cat([top_idx.reshape(-1), random_tokens]))


def distillation_loss(draft_logits: torch.Tensor, top_idx: torch.Tensor, top_logit: torch.Tensor,
                      hard_label_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft cross-entropy against the target's renormalised top-k, plus CE on the target's argmax.

    ``top_idx`` indexes the columns of ``draft_logits``; column 0 of the (sorted) top-k is the target's argmax.
    """
    draft_log_probs = torch.log_softmax(draft_logits.float(), dim=-1)
    target_probs = torch.softmax(top_logit, dim=-1)
    draft_top = draft_log_probs.gather(1, top_idx)
    soft = -(target_probs * draft_top).sum(-1).mean()
    hard = -draft_top[:, 0].mean()
    agreement = (draft_logits.argmax(-1) == top_idx[:, 0]).float().mean()
    return soft + hard_label_weight * hard, agreement


def answer_hidden(draft: LlamaForCausalLM, batch: dict) -> torch.Tensor:
    """Final hidden states at the answer positions only (the output head is the expensive part)."""
    hidden = draft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch["flat_positions"]]


def training_loss(draft: LlamaForCausalLM, batch: dict, train_cfg: dict,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    candidates = candidate_tokens(batch["top_idx"], draft.config.vocab_size, train_cfg["candidate_negatives"],
                                  generator)
    with torch.autocast(draft.device.type, dtype=torch.bfloat16, enabled=train_cfg["autocast_bf16"]):
        hidden = answer_hidden(draft, batch)
        draft_logits = hidden @ draft.lm_head.weight[candidates].T
    local_top_idx = torch.searchsorted(candidates, batch["top_idx"])
    return distillation_loss(draft_logits, local_top_idx, batch["top_logit"], train_cfg["hard_label_weight"])


def learning_rate_scale(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(draft: LlamaForCausalLM, train_cfg: dict) -> torch.optim.Optimizer:
    """AdamW with its own learning rate for the input embedding, the output head and the layers."""
    input_embedding = draft.get_input_embeddings().weight
    output_head = draft.lm_head.weight
    groups = [{"params": [output_head], "lr": train_cfg["head_learning_rate"]}]
    if input_embedding is not output_head:
        groups.append({"params": [input_embedding], "lr": train_cfg["input_embedding_learning_rate"]})
    special = {id(input_embedding), id(output_head)}
    groups.append({"params": [p for p in draft.parameters() if id(p) not in special],
                   "lr": train_cfg["learning_rate"]})
    return torch.optim.AdamW(groups, weight_decay=train_cfg["weight_decay"], betas=(0.9, 0.98))


def planned_steps(train_cfg: dict, steps_available: int, seconds_per_step: float, deadline: Deadline,
                  steps_done: int = 0) -> int:
    """Steps for the whole run: the configured epochs, fewer if the time budget cannot fit them.

    Called with the measured time per step after ``steps_done`` steps: at the end of warm-up, and again at
    ``REPLAN_AFTER_WARMUPS`` multiples of it; the cosine schedule decays over the last plan. The log records
    the number, so a rerun can pin it with ``train.max_steps``.
    """
    steps = min(steps_available, train_cfg.get("max_steps") or steps_available)
    if deadline.seconds is not None:
        steps = min(steps, steps_done + int(deadline.remaining() / seconds_per_step))
    return max(steps, train_cfg["warmup_steps"], steps_done)


# A time-budgeted run plans its length again after these many warm-ups, from the time per step since the last
# plan: on a GPU a step is slow until the allocator has grown and kernels are chosen for most padded lengths
# (an H100 ran 0.10 s per step at the end of warm-up, 0.05 s by step 500 and 0.034 s after step 1,000, so one
# plan at warm-up used half the budget).
REPLAN_AFTER_WARMUPS = (4, 16)


def stage_train(cfg: dict) -> None:
    train_cfg = cfg["train"]
    cache_dir = repo_path(cfg["cache_dir"])
    device = pick_device(cfg.get("device", "cpu"))
    deadline = Deadline(train_cfg.get("time_budget_s"))
    records = load_shards(cache_dir / "shards")
    if not records:
        raise SystemExit("no generated data; run --stage generate first")
    for extra_dir in train_cfg.get("extra_shard_dirs", []):
        extra = load_shards(repo_path(extra_dir))
        if not extra:
            raise SystemExit(f"train.extra_shard_dirs: no shards in {extra_dir}; run that config's generate stage")
        records += extra
    log.info("%d sequences, %d answer tokens", len(records), sum(len(r["topk_idx"]) for r in records))
    validation_dir = train_cfg.get("validation_shard_dir") or cache_dir / "validation"
    validation_records = load_shards(repo_path(validation_dir))
    budgets = train_cfg.get("score_budgets", [2, 4, 6, 8])
    draft = initial_draft(cfg, default_target_dir()).to(device)
    before = None
    if train_cfg.get("init_from"):
        before = validation_scores(draft.eval(), validation_records, budgets)
        log.info("validation before training: %s", json.dumps(before))
    draft.train()
    log.info("draft parameters: %.2fM, device %s", sum(p.numel() for p in draft.parameters()) / 1e6, device)
    optimizer = make_optimizer(draft, train_cfg)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    rng = random.Random(cfg["seed"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    epochs = [make_batches(records, train_cfg["batch_sequences"], rng) for _ in range(train_cfg["epochs"])]
    schedule = [batch for batches in epochs for batch in batches]
    total_steps = len(schedule)
    warmup = train_cfg["warmup_steps"]
    pad_id = draft.config.pad_token_id
    running_loss, running_agreement = 0.0, 0.0
    step, timing_from, timing_step = 0, time.time(), 0
    plan_at = {warmup, *(n * warmup for n in REPLAN_AFTER_WARMUPS if deadline.seconds is not None)}
    while step < total_steps:
        if step == warmup // 2:
            timing_from, timing_step = time.time(), step  # the first steps also pay for start-up (CUDA context)
        if step in plan_at:
            seconds_per_step = (time.time() - timing_from) / max(1, step - timing_step)
            total_steps = planned_steps(train_cfg, len(schedule), seconds_per_step, deadline, steps_done=step)
            log.info("%.3f s per step: %d steps planned (%.2f epochs)", seconds_per_step, total_steps,
                     total_steps / len(epochs[0]))
            timing_from, timing_step = time.time(), step
        batch = collate(schedule[step], pad_id, device)
        scale = learning_rate_scale(step, total_steps, warmup)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * scale
        loss, agreement = training_loss(draft, batch, train_cfg, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), train_cfg["grad_clip"])
        optimizer.step()
        step += 1
        running_loss += loss.item()
        running_agreement += agreement.item()
        if step % train_cfg["log_every"] == 0:
            log.info("step %d/%d loss %.3f top1 agreement %.3f lr %.2e %.0f s", step, total_steps,
                     running_loss / train_cfg["log_every"], running_agreement / train_cfg["log_every"],
                     base_lrs[-1] * scale, deadline.elapsed())
            running_loss, running_agreement = 0.0, 0.0
    draft.eval()
    scores = validation_scores(draft, validation_records, budgets)
    out_dir = run_dir(cfg)
    draft.to("cpu").save_pretrained(out_dir / "draft_fp32")
    scores.update(steps=total_steps, train_seconds=round(deadline.elapsed(), 1), draft=cfg["draft"])
    if before is not None:
        scores["before_training"] = before
    with open(out_dir / "validation.json", "w") as f:
        json.dump(scores, f, indent=2)
    log.info("saved the trained draft to %s; validation: %s", out_dir / "draft_fp32", json.dumps(scores))


# ----------------------------------------------------------------------------------------------------------
# validation: how the draft would do as a greedy speculative drafter on the target's own answers


def committed_per_round(matches: list[bool], budget: int) -> tuple[int, int]:
    """(tokens, rounds) of greedy chain speculation reproducing a sequence, from teacher-forced matches.

    ``matches[j]`` says whether the draft's argmax given the target's first ``j`` tokens is the target's token
    ``j``. While the draft agrees, its own greedy rollout *is* the target's prefix, so a round starting at
    ``p`` accepts the run of matches from ``p`` (at most ``budget``, and short enough that the target's own
    token still fits) and commits one more token: the target's.
    """
    position, rounds, total = 0, 0, len(matches)
    while position < total:
        limit = min(budget, total - position - 1)
        accepted = 0
        while accepted < limit and matches[position + accepted]:
            accepted += 1
        position += accepted + 1
        rounds += 1
    return total, rounds


@torch.no_grad()
def validation_scores(draft: LlamaForCausalLM, records: list[dict], budgets: list[int]) -> dict:
    """Agreement and mean committed tokens per round on the (greedy) validation answers."""
    matched = positions = 0
    tokens = {k: 0 for k in budgets}
    rounds = {k: 0 for k in budgets}
    for record in records:
        answer_start = record["prompt_len"]
        sequence = record["input_ids"].long()[None].to(draft.device)
        predicted = draft(input_ids=sequence).logits[0, answer_start - 1:-1].argmax(-1).cpu()
        matches = (predicted == record["input_ids"][answer_start:].long()).tolist()
        matched, positions = matched + sum(matches), positions + len(matches)
        for k in budgets:
            t, r = committed_per_round(matches, k)
            tokens[k], rounds[k] = tokens[k] + t, rounds[k] + r
    return {
        "validation_answers": len(records),
        "validation_tokens": positions,
        "agreement": matched / max(1, positions),
        "committed_per_round": {str(k): tokens[k] / max(1, rounds[k]) for k in budgets},
    }


# ----------------------------------------------------------------------------------------------------------
# stage 3: export into the repository


def stage_export(cfg: dict) -> None:
    output_dir = repo_path(cfg["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    target_dir = default_target_dir()
    draft = LlamaForCausalLM.from_pretrained(run_dir(cfg) / "draft_fp32", dtype=torch.float32)
    draft = draft.to(DTYPES[cfg["export"]["dtype"]])
    draft.config.dtype = cfg["export"]["dtype"]
    draft.save_pretrained(output_dir, max_shard_size=cfg["export"].get("max_shard_size", "50GB"))
    for name in TOKENIZER_FILES:
        if (target_dir / name).exists():
            shutil.copy2(target_dir / name, output_dir / name)
    GenerationConfig(bos_token_id=draft.config.bos_token_id, eos_token_id=draft.config.eos_token_id,
                     pad_token_id=draft.config.pad_token_id, do_sample=False).save_pretrained(output_dir)
    log.info("exported the draft (%s) to %s", cfg["export"]["dtype"], output_dir)


# ----------------------------------------------------------------------------------------------------------


STAGES = {"generate": stage_generate, "train": stage_train, "export": stage_export}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent / "config.json")
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config entry, e.g. --set draft.num_hidden_layers=3")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(cfg["threads"])
    seed_everything(cfg["seed"])
    for name, stage in STAGES.items():
        if args.stage in (name, "all"):
            log.info("stage %s", name)
            stage(cfg)


if __name__ == "__main__":
    main()
