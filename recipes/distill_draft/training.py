"""The train stage: teacher forcing on prompt + answer, matching the target's next-token distribution on the
answer tokens (soft cross-entropy against its renormalised top-k, plus a small hard-label term on its
argmax), then scoring the draft on the validation answers (``validation.py``)."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from duo.common.default_models import default_target_dir
from transformers import LlamaForCausalLM

from recipes.distill_draft.draft_init import initial_draft
from recipes.distill_draft.recipe_config import RecipeConfig, TrainConfig, repo_path
from recipes.distill_draft.runtime import Deadline, pick_device
from recipes.distill_draft.teacher_answers import load_shards
from recipes.distill_draft.typed_json import to_json
from recipes.distill_draft.validation import validation_scores

log = logging.getLogger(__name__)

# A time-budgeted run plans its length again after these many warm-ups, from the time per step since the last
# plan: on a GPU a step keeps getting faster long after warm-up (the allocator grows, kernels get chosen for
# more padded lengths), so a single plan at the end of warm-up would stop far short of the budget.
REPLAN_AFTER_WARMUPS = (4, 16)


def run_dir(cfg: RecipeConfig) -> Path:
    """Where the train stage writes this run's checkpoint and validation scores.

    ``run_name`` "best" (for export) names the finished run with the most tokens committed per round on the
    validation answers, at its best budget.
    """
    runs = repo_path(cfg.cache_dir) / "runs"
    if cfg.run_name != "best":
        return runs / cfg.run_name
    scored = {path.parent: json.loads(path.read_text()) for path in runs.glob("*/validation.json")}
    if not scored:
        raise SystemExit(f"no finished runs under {runs}")
    best = max(scored, key=lambda run: max(scored[run]["committed_per_round"].values()))
    log.info("best run by validation: %s %s", best.name, json.dumps(scored[best]["committed_per_round"]))
    return best


def make_batches(records: list[dict], batch_sequences: int, rng: random.Random) -> list[list[dict]]:
    """Shuffle, then group sequences of similar length to limit padding."""
    order = list(range(len(records)))
    rng.shuffle(order)
    chunk = batch_sequences * 16
    batches: list[list[dict]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start:start + chunk], key=lambda i: len(records[i]["input_ids"]))
        batches.extend([records[i] for i in block[j:j + batch_sequences]]
                       for j in range(0, len(block), batch_sequences))
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


def candidate_tokens(top_idx: torch.Tensor, vocab_size: int, negatives: int,
                     generator: torch.Generator) -> torch.Tensor:
    """The output rows scored this step: every token in the batch's teacher top-k plus random negatives.

    Scoring only these rows (a sampled softmax) makes a training step several times cheaper than the full
    softmax over the vocabulary on a CPU; the random negatives, redrawn every step, keep pushing the other
    tokens down. ``negatives <= 0`` scores the full vocabulary (what a GPU can afford).
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


def training_loss(draft: LlamaForCausalLM, batch: dict, train: TrainConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    candidates = candidate_tokens(batch["top_idx"], draft.config.vocab_size, train.candidate_negatives, generator)
    with torch.autocast(draft.device.type, dtype=torch.bfloat16, enabled=train.autocast_bf16):
        hidden = answer_hidden(draft, batch)
        draft_logits = hidden @ draft.lm_head.weight[candidates].T
    local_top_idx = torch.searchsorted(candidates, batch["top_idx"])
    return distillation_loss(draft_logits, local_top_idx, batch["top_logit"], train.hard_label_weight)


def learning_rate_scale(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(draft: LlamaForCausalLM, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with its own learning rate for the input embedding, the output head and the layers."""
    input_embedding = draft.get_input_embeddings().weight
    output_head = draft.lm_head.weight
    groups = [{"params": [output_head], "lr": train.head_learning_rate}]
    if input_embedding is not output_head:
        groups.append({"params": [input_embedding], "lr": train.input_embedding_learning_rate})
    special = {id(input_embedding), id(output_head)}
    groups.append({"params": [p for p in draft.parameters() if id(p) not in special], "lr": train.learning_rate})
    return torch.optim.AdamW(groups, weight_decay=train.weight_decay, betas=(0.9, 0.98))


def planned_steps(train: TrainConfig, steps_available: int, seconds_per_step: float, deadline: Deadline,
                  steps_done: int = 0) -> int:
    """Steps for the whole run: the configured epochs, fewer if the time budget cannot fit them.

    Called with the measured time per step after ``steps_done`` steps: at the end of warm-up, and again at
    ``REPLAN_AFTER_WARMUPS`` multiples of it; the cosine schedule decays over the last plan. The log records
    the number, so a rerun can pin it with ``train.max_steps``.
    """
    steps = min(steps_available, train.max_steps or steps_available)
    if deadline.seconds is not None:
        steps = min(steps, steps_done + int(deadline.remaining() / seconds_per_step))
    return max(steps, train.warmup_steps, steps_done)


def training_records(cfg: RecipeConfig) -> list[dict]:
    """This config's answer shards and those of ``train.extra_shard_dirs``."""
    records = load_shards(repo_path(cfg.cache_dir) / "shards")
    if not records:
        raise SystemExit("no generated data; run --stage generate first")
    for extra_dir in cfg.train.extra_shard_dirs:
        extra = load_shards(repo_path(extra_dir))
        if not extra:
            raise SystemExit(f"train.extra_shard_dirs: no shards in {extra_dir}; run that config's generate stage")
        records += extra
    return records


def stage_train(cfg: RecipeConfig) -> None:
    train = cfg.train
    device = pick_device(cfg.device)
    deadline = Deadline(train.time_budget_s)
    records = training_records(cfg)
    log.info("%d sequences, %d answer tokens", len(records), sum(len(r["topk_idx"]) for r in records))
    validation_records = load_shards(repo_path(train.validation_shard_dir or f"{cfg.cache_dir}/validation"))
    draft = initial_draft(cfg, default_target_dir()).to(device)
    before = None
    if train.init_from:
        before = validation_scores(draft.eval(), validation_records, train.score_budgets)
        log.info("validation before training: %s", json.dumps(before))
    draft.train()
    log.info("draft parameters: %.2fM, device %s", sum(p.numel() for p in draft.parameters()) / 1e6, device)
    optimizer = make_optimizer(draft, train)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    rng = random.Random(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    epochs = [make_batches(records, train.batch_sequences, rng) for _ in range(train.epochs)]
    schedule = [batch for batches in epochs for batch in batches]
    total_steps = len(schedule)
    warmup = train.warmup_steps
    pad_id = draft.config.pad_token_id
    running_loss, running_agreement = 0.0, 0.0
    step, timing_from, timing_step = 0, time.time(), 0
    plan_at = {warmup, *(n * warmup for n in REPLAN_AFTER_WARMUPS if deadline.seconds is not None)}
    while step < total_steps:
        if step == warmup // 2:
            timing_from, timing_step = time.time(), step  # the first steps also pay for start-up (CUDA context)
        if step in plan_at:
            seconds_per_step = (time.time() - timing_from) / max(1, step - timing_step)
            total_steps = planned_steps(train, len(schedule), seconds_per_step, deadline, steps_done=step)
            log.info("%.3f s per step: %d steps planned (%.2f epochs)", seconds_per_step, total_steps,
                     total_steps / len(epochs[0]))
            timing_from, timing_step = time.time(), step
        batch = collate(schedule[step], pad_id, device)
        scale = learning_rate_scale(step, total_steps, warmup)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * scale
        loss, agreement = training_loss(draft, batch, train, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), train.grad_clip)
        optimizer.step()
        step += 1
        running_loss += loss.item()
        running_agreement += agreement.item()
        if step % train.log_every == 0:
            log.info("step %d/%d loss %.3f top1 agreement %.3f lr %.2e %.0f s", step, total_steps,
                     running_loss / train.log_every, running_agreement / train.log_every,
                     base_lrs[-1] * scale, deadline.elapsed())
            running_loss, running_agreement = 0.0, 0.0
    draft.eval()
    scores = validation_scores(draft, validation_records, train.score_budgets)
    out_dir = run_dir(cfg)
    draft.to("cpu").save_pretrained(out_dir / "draft_fp32")
    scores.update(steps=total_steps, train_seconds=round(deadline.elapsed(), 1), draft=to_json(cfg.draft))
    if before is not None:
        scores["before_training"] = before
    (out_dir / "validation.json").write_text(json.dumps(scores, indent=2))
    log.info("saved the trained draft to %s; validation: %s", out_dir / "draft_fp32", json.dumps(scores))
