"""The generate stage: the target's answers to the training and validation prompts, with its top-k next-token
logits at every answer position (the distillation signal, at no extra forward pass).

Prompts come from the template bank or are written by the target itself (``data.prompt_source``); either
way they are checked to be disjoint from the held-out benchmark prompts. Each batch of answers is saved as
one shard, so an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from duo.common.default_models import default_target_dir
from duo.common.prompt_sets import read_prompt_file, user_prompt_ids
from transformers import AutoTokenizer, DynamicCache

from recipes.distill_draft.draft_init import cached_next_token_states
from recipes.distill_draft.heldout_overlap import assert_disjoint
from recipes.distill_draft.prompt_bank import build_prompts
from recipes.distill_draft.recipe_config import DataConfig, RecipeConfig, repo_path
from recipes.distill_draft.runtime import DTYPES, Deadline, load_target, pick_device
from recipes.distill_draft.self_prompts import write_prompts

log = logging.getLogger(__name__)

SELF_WRITTEN_PROMPTS = "self_written_prompts.json"  # in the cache folder


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_batch(target, prompt_ids: list[list[int]], data: DataConfig, sampled: bool,
                   generator: torch.Generator, eos_id: int) -> list[dict]:
    """Answer a batch of prompts with the target; keep the top-k logits at every answer position.

    Everything stays on the target's device until the batch is done; an answer ends with (and includes)
    its first EOS, or after ``max_new_tokens`` tokens.
    """
    device = target.device
    top_k, steps = data.teacher_top_k, data.max_new_tokens
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
            target_probs = torch.softmax(target_logits / data.temperature, dim=-1)
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


def split_prompts(cfg: RecipeConfig, target=None, tokenizer=None) -> tuple[list[str], list[str]]:
    """(training, validation) prompts, drawn together so they are distinct, both disjoint from the held-out set.

    ``data.prompt_source`` "bank" draws them from the template bank; "self" has the target write them
    (``self_prompts.write_prompts``; needs ``target`` and ``tokenizer``), cached in the cache folder.
    """
    validation_count = cfg.data.num_validation_prompts
    count = cfg.data.num_prompts + validation_count
    heldout = read_prompt_file(repo_path(cfg.heldout_prompts))
    if cfg.data.prompt_source == "bank":
        prompts = build_prompts(count, cfg.data.prompt_seed)
    else:
        prompts = cached_self_written_prompts(cfg, count, heldout, target, tokenizer)
    assert_disjoint(prompts, heldout)
    return prompts[validation_count:], prompts[:validation_count]


def cached_self_written_prompts(cfg: RecipeConfig, count: int, heldout: list[str], target, tokenizer) -> list[str]:
    path = repo_path(cfg.cache_dir) / SELF_WRITTEN_PROMPTS
    if path.exists():
        prompts = json.loads(path.read_text())
        if len(prompts) >= count:
            return prompts[:count]
    settings = cfg.data.self_prompts
    known = [p for name in settings.exclude_prompt_files for p in json.loads(repo_path(name).read_text())]
    started = time.time()
    prompts = write_prompts(target, tokenizer, count, heldout, settings, cfg.seed, known_prompts=known)
    log.info("the target wrote %d prompts in %.0f s", len(prompts), time.time() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompts, indent=0))
    return prompts


def stage_generate(cfg: RecipeConfig) -> None:
    data = cfg.data
    cache_dir = repo_path(cfg.cache_dir)
    target_dir = default_target_dir()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = load_target(target_dir, DTYPES[data.teacher_dtype], pick_device(cfg.device))
    train_prompts, validation_prompts = split_prompts(cfg, target, tokenizer)
    log.info("%d training and %d validation prompts, disjoint from the held-out set", len(train_prompts),
             len(validation_prompts))
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "train_prompts.json").write_text(json.dumps(train_prompts, indent=0))
    (cache_dir / "validation_prompts.json").write_text(json.dumps(validation_prompts, indent=0))

    validation_batches = length_sorted_batches([user_prompt_ids(tokenizer, p) for p in validation_prompts],
                                               data.batch_size, 0)
    write_shards(target, validation_batches, cache_dir / "validation", cfg, tokenizer.eos_token_id,
                 sampled_every=0, deadline=Deadline(None))
    train_batches = length_sorted_batches([user_prompt_ids(tokenizer, p) for p in train_prompts], data.batch_size,
                                          data.sort_window_batches)
    train_batches = train_batches[:data.max_batches or len(train_batches)]
    write_shards(target, train_batches, cache_dir / "shards", cfg, tokenizer.eos_token_id,
                 sampled_every=round(1 / data.sampled_batch_fraction) if data.sampled_batch_fraction else 0,
                 deadline=Deadline(data.time_budget_s))
    if not cfg.train.init_from:
        cached_next_token_states(cfg, target_dir, tokenizer, target)  # the train stage's initialisation, once


def write_shards(target, batches: list[list[list[int]]], shard_dir: Path, cfg: RecipeConfig, eos_id: int,
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
        generator = torch.Generator(device=target.device).manual_seed(cfg.seed + index)
        records = generate_batch(target, batch, cfg.data, sampled, generator, eos_id)
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
