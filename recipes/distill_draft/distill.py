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
    vocab = target.config.vocab_size
    prefix_cache = DynamicCache()
    target.model(input_ids=torch.tensor([prefix_ids]).repeat(batch_size, 1), past_key_values=prefix_cache,
                 use_cache=True)
    states = torch.empty(vocab, target.config.hidden_size)
    for start in range(0, vocab, batch_size):
        tokens = torch.arange(start, start + batch_size) % vocab
        hidden = target.model(input_ids=tokens[:, None], past_key_values=copy.deepcopy(prefix_cache),
                              use_cache=True).last_hidden_state[:, -1]
        count = min(batch_size, vocab - start)
        states[start:start + count] = hidden[:count].float()
    return states


def cached_next_token_states(cfg: dict, target_dir: Path, tokenizer) -> torch.Tensor:
    path = repo_path(cfg["cache_dir"]) / "next_token_states.pt"
    if path.exists():
        return torch.load(path)
    draft_cfg = cfg["draft"]
    prefix_ids = tokenizer(draft_cfg["next_token_prefix"], add_special_tokens=False)["input_ids"]
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=DTYPES[cfg["data"]["teacher_dtype"]]).eval()
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


def candidate_tokens(top_idx: torch.Tensor, vocab_size: int, negatives: int, generator: torch.Generator) -> torch.Tensor:
    """The output rows scored this step: every token in the batch's teacher top-k plus random negatives.

    Scoring only these rows (a sampled softmax) makes a training step several times cheaper than the full
    49,152-way softmax; the random negatives, redrawn every step, keep pushing the other tokens down.
    """
    if negatives <= 0:
        return torch.arange(vocab_size)
    random_tokens = torch.randint(0, vocab_size, (negatives,), generator=generator)
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
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_cfg["autocast_bf16"]):
        hidden = answer_hidden(draft, batch)
        draft_logits = hidden @ draft.lm_head.weight[candidates].T
    local_top_idx = torch.searchsorted(candidates, batch["top_idx"])
    return distillation_loss(draft_logits, local_top_idx, batch["top_logit"], train_cfg["hard_label_weight"])


def learning_rate_scale(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
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


def stage_train(cfg: dict) -> None:
    train_cfg = cfg["train"]
    cache_dir = repo_path(cfg["cache_dir"])
    records = load_shards(cache_dir)
    if not records:
        raise SystemExit("no generated data; run --stage generate first")
    log.info("%d sequences, %d answer tokens", len(records), sum(len(r["topk_idx"]) for r in records))
    draft = build_draft(cfg, default_target_dir())
    draft.train()
    log.info("draft parameters: %.2fM", sum(p.numel() for p in draft.parameters()) / 1e6)
    optimizer = make_optimizer(draft, train_cfg)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    rng = random.Random(cfg["seed"])
    generator = torch.Generator().manual_seed(cfg["seed"])
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
            loss, agreement = training_loss(draft, batch, train_cfg, generator)
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
                         running_agreement / train_cfg["log_every"], base_lrs[-1] * scale, time.time() - started)
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
