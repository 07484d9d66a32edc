"""Distil duo's default draft model from SmolLM2-135M-Instruct on a CPU.

Stages (run all with ``python recipes/distill_draft/distill.py``, or one with ``--stage``):

1. ``generate``: build the training prompts (``prompt_bank.build_prompts``, fixed seed), check they are
   disjoint from the held-out benchmark prompts, format them with the target's chat template, and let the
   target answer them in left-padded batches (half greedy, half sampled at temperature 0.7). At every answer
   position the target's top-k next-token logits are kept as the distillation signal. Each batch is written
   as a shard under ``<cache_dir>/shards`` so the stage can resume.
2. ``train``: build a small Llama draft (same tokenizer and vocabulary, tied embeddings initialised from an
   SVD projection of the target's embedding matrix) and train it with teacher forcing to match the target's
   next-token distribution (soft cross-entropy against the renormalised top-k plus a small hard-label term on
   the target's argmax) on the answer tokens.
3. ``export``: write the draft in the shipped dtype with the target's tokenizer files and a generation config
   into ``output_dir`` (``draft_service/default_model`` by default).

All hyper-parameters and seeds live in ``config.json`` next to this file. Paths in it are relative to the
repository root. The target folder comes from ``duo_common.default_models.default_target_dir()``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from duo_common.default_models import default_target_dir  # noqa: E402
from prompt_bank import assert_disjoint, build_prompts  # noqa: E402
from transformers import (  # noqa: E402
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


def load_config(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def repo_path(value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


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
    """Answer a batch of prompts with the target; keep the top-k logits at every answer position."""
    top_k = data_cfg["teacher_top_k"]
    input_ids, attention_mask = left_pad(prompt_ids, eos_id)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 past_key_values=cache, use_cache=True, logits_to_keep=1)
    batch = len(prompt_ids)
    answers: list[list[int]] = [[] for _ in range(batch)]
    top_idx: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    top_val: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool)
    for step in range(data_cfg["max_new_tokens"]):
        target_logits = out.logits[:, -1].float()
        values, indices = target_logits.topk(top_k, dim=-1)
        if sampled:
            target_probs = torch.softmax(target_logits / data_cfg["temperature"], dim=-1)
            next_tokens = torch.multinomial(target_probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = target_logits.argmax(-1)
        for row in range(batch):
            if not finished[row]:
                answers[row].append(int(next_tokens[row]))
                top_idx[row].append(indices[row].to(torch.int32))
                top_val[row].append(values[row].to(torch.float16))
        finished |= next_tokens == eos_id
        if bool(finished.all()) or step == data_cfg["max_new_tokens"] - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = target(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=cache, use_cache=True)
    return [
        {
            "input_ids": torch.tensor(prompt_ids[row] + answers[row], dtype=torch.int32),
            "prompt_len": len(prompt_ids[row]),
            "topk_idx": torch.stack(top_idx[row]),
            "topk_logit": torch.stack(top_val[row]),
            "sampled": sampled,
        }
        for row in range(batch)
    ]


def stage_generate(cfg: dict) -> None:
    data_cfg = cfg["data"]
    shard_dir = repo_path(cfg["cache_dir"]) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    target_dir = default_target_dir()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompts = build_prompts(data_cfg["num_prompts"], data_cfg["prompt_seed"])
    assert_disjoint(prompts, read_heldout_prompts(repo_path(cfg["heldout_prompts"])))
    log.info("%d training prompts, disjoint from the held-out set", len(prompts))
    with open(shard_dir.parent / "train_prompts.json", "w") as f:
        json.dump(prompts, f, indent=0)

    prompt_ids = sorted((chat_ids(tokenizer, p) for p in prompts), key=len)
    batch_size = data_cfg["batch_size"]
    batches = [prompt_ids[i:i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    sampled_every = round(1 / data_cfg["sampled_batch_fraction"]) if data_cfg["sampled_batch_fraction"] else 0
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=DTYPES[data_cfg["teacher_dtype"]]).eval()
    started = time.time()
    for index, batch in enumerate(batches):
        shard_path = shard_dir / f"shard_{index:04d}.pt"
        if shard_path.exists():
            continue
        sampled = bool(sampled_every) and index % sampled_every == sampled_every - 1
        generator = torch.Generator().manual_seed(cfg["seed"] + index)
        records = generate_batch(target, batch, data_cfg, sampled, generator, tokenizer.eos_token_id)
        torch.save(records, shard_path)
        answer_tokens = sum(len(r["topk_idx"]) for r in records)
        log.info("shard %d/%d (%s): %d answer tokens, %.0f s elapsed", index + 1, len(batches),
                 "sampled" if sampled else "greedy", answer_tokens, time.time() - started)


def load_shards(cache_dir: Path) -> list[dict]:
    records: list[dict] = []
    for shard_path in sorted((cache_dir / "shards").glob("shard_*.pt")):
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
        tie_word_embeddings=True,
        bos_token_id=target_config.bos_token_id,
        eos_token_id=target_config.eos_token_id,
        pad_token_id=target_config.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )


def svd_embedding(target_embedding: torch.Tensor, width: int) -> torch.Tensor:
    """The target's embedding rows projected on their top ``width`` principal directions (uncentred SVD)."""
    _, _, v_transposed = torch.linalg.svd(target_embedding.double(), full_matrices=False)
    projected = target_embedding.double() @ v_transposed[:width].T
    return (projected / projected.std() * target_embedding.double().std()).float()


def build_draft(target_dir: Path, draft_cfg: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    draft = LlamaForCausalLM(draft_config(target.config, draft_cfg))
    if draft_cfg["init_embedding"] == "svd":
        embedding = svd_embedding(target.get_input_embeddings().weight.detach(), draft_cfg["hidden_size"])
        draft.get_input_embeddings().weight.data.copy_(embedding)
    draft.tie_weights()
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


def collate(batch: list[dict], pad_id: int) -> dict:
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
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "flat_positions": torch.cat(flat_positions),
        "top_idx": torch.cat(top_idx),
        "top_logit": torch.cat(top_logit),
    }


def distillation_loss(draft_logits: torch.Tensor, top_idx: torch.Tensor, top_logit: torch.Tensor,
                      hard_label_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft cross-entropy against the target's renormalised top-k, plus CE on the target's argmax."""
    draft_log_probs = torch.log_softmax(draft_logits.float(), dim=-1)
    target_probs = torch.softmax(top_logit, dim=-1)
    draft_top = draft_log_probs.gather(1, top_idx)
    soft = -(target_probs * draft_top).sum(-1).mean()
    hard = -draft_top[:, 0].mean()  # topk is sorted: column 0 is the target's argmax
    agreement = (draft_logits.argmax(-1) == top_idx[:, 0]).float().mean()
    return soft + hard_label_weight * hard, agreement


def answer_logits(draft: LlamaForCausalLM, batch: dict) -> torch.Tensor:
    """Draft logits at the answer positions only (the LM head is the expensive part)."""
    hidden = draft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch["flat_positions"]]
    return draft.lm_head(hidden)


def learning_rate_scale(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(draft: LlamaForCausalLM, train_cfg: dict) -> torch.optim.Optimizer:
    embedding = draft.get_input_embeddings().weight
    others = [p for p in draft.parameters() if p is not embedding]
    return torch.optim.AdamW(
        [{"params": [embedding], "lr": train_cfg["embedding_learning_rate"]},
         {"params": others, "lr": train_cfg["learning_rate"]}],
        weight_decay=train_cfg["weight_decay"], betas=(0.9, 0.98),
    )


def stage_train(cfg: dict) -> None:
    train_cfg = cfg["train"]
    cache_dir = repo_path(cfg["cache_dir"])
    records = load_shards(cache_dir)
    if not records:
        raise SystemExit("no generated data; run --stage generate first")
    log.info("%d sequences, %d answer tokens", len(records), sum(len(r["topk_idx"]) for r in records))
    target_dir = default_target_dir()
    draft = build_draft(target_dir, cfg["draft"], cfg["seed"])
    draft.train()
    log.info("draft parameters: %.2fM", sum(p.numel() for p in draft.parameters()) / 1e6)
    optimizer = make_optimizer(draft, train_cfg)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    rng = random.Random(cfg["seed"])
    epochs = [make_batches(records, train_cfg["batch_sequences"], rng) for _ in range(train_cfg["epochs"])]
    total_steps = sum(len(e) for e in epochs)
    pad_id = draft.config.pad_token_id
    step, started = 0, time.time()
    running_loss, running_agreement = 0.0, 0.0
    for epoch, batches in enumerate(epochs):
        for raw_batch in batches:
            batch = collate(raw_batch, pad_id)
            scale = learning_rate_scale(step, total_steps, train_cfg["warmup_steps"])
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * scale
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_cfg["autocast_bf16"]):
                draft_logits = answer_logits(draft, batch)
            loss, agreement = distillation_loss(draft_logits, batch["top_idx"], batch["top_logit"],
                                                train_cfg["hard_label_weight"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), train_cfg["grad_clip"])
            optimizer.step()
            step += 1
            running_loss += loss.item()
            running_agreement += agreement.item()
            if step % train_cfg["log_every"] == 0:
                log.info("epoch %d step %d/%d loss %.3f top1 agreement %.3f lr %.2e %.0f s", epoch, step,
                         total_steps, running_loss / train_cfg["log_every"],
                         running_agreement / train_cfg["log_every"], base_lrs[1] * scale, time.time() - started)
                running_loss, running_agreement = 0.0, 0.0
    draft.eval()
    draft.save_pretrained(cache_dir / "draft_fp32")
    log.info("saved the trained draft to %s after %.0f s", cache_dir / "draft_fp32", time.time() - started)


# ----------------------------------------------------------------------------------------------------------
# stage 3: export into the repository


def stage_export(cfg: dict) -> None:
    cache_dir = repo_path(cfg["cache_dir"])
    output_dir = repo_path(cfg["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    target_dir = default_target_dir()
    draft = LlamaForCausalLM.from_pretrained(cache_dir / "draft_fp32", dtype=torch.float32)
    draft = draft.to(DTYPES[cfg["export"]["dtype"]])
    draft.config.dtype = cfg["export"]["dtype"]
    draft.save_pretrained(output_dir)
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config)
    torch.set_num_threads(cfg["threads"])
    seed_everything(cfg["seed"])
    for name, stage in STAGES.items():
        if args.stage in (name, "all"):
            log.info("stage %s", name)
            stage(cfg)


if __name__ == "__main__":
    main()
