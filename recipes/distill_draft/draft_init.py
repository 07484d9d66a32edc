"""The draft before training: a small Llama built from the target's output layer and its next-token hidden
states, or a trained draft to fine-tune (``train.init_from``)."""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

from recipes.distill_draft.recipe_config import DraftConfig, RecipeConfig, repo_path
from recipes.distill_draft.runtime import DTYPES, load_target, pick_device
from recipes.distill_draft.typed_json import to_json

log = logging.getLogger(__name__)


def draft_config(target_config, draft: DraftConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=draft.hidden_size,
        intermediate_size=draft.intermediate_size,
        num_hidden_layers=draft.num_hidden_layers,
        num_attention_heads=draft.num_attention_heads,
        num_key_value_heads=draft.num_key_value_heads,
        head_dim=draft.head_dim,
        max_position_embeddings=draft.max_position_embeddings,
        rms_norm_eps=target_config.rms_norm_eps,
        rope_parameters=dict(target_config.rope_parameters),
        hidden_act=target_config.hidden_act,
        tie_word_embeddings=draft.tie_word_embeddings,
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
    "bigram" knowledge of the whole vocabulary, including the tokens the generated answers never contain.
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


def cached_next_token_states(cfg: RecipeConfig, target_dir: Path, tokenizer, target=None) -> torch.Tensor:
    """``next_token_states`` for the configured prefix, computed once per cache folder."""
    path = repo_path(cfg.cache_dir) / "next_token_states.pt"
    if path.exists():
        return torch.load(path)
    prefix_ids = tokenizer(cfg.draft.next_token_prefix, add_special_tokens=False)["input_ids"]
    if target is None:
        target = load_target(target_dir, DTYPES[cfg.data.teacher_dtype], pick_device(cfg.device))
    started = time.time()
    states = next_token_states(target, prefix_ids, cfg.draft.next_token_batch)
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


def build_draft(cfg: RecipeConfig, target_dir: Path) -> LlamaForCausalLM:
    """The draft, initialised from the target's output layer and its next-token hidden states.

    The output head is a rank-``hidden_size`` factorisation of the target's output layer (``logit_basis``).
    With untied embeddings each input row is the target's hidden state after the token, mapped into the
    draft's space, and the final norm is scaled to the target's logit scale, so before any training the
    draft already approximates what the target predicts from the last token alone.
    """
    width = cfg.draft.hidden_size
    torch.manual_seed(cfg.seed)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    draft = LlamaForCausalLM(draft_config(target.config, cfg.draft))
    target_embedding = target.get_input_embeddings().weight.detach()
    states = cached_next_token_states(cfg, target_dir, AutoTokenizer.from_pretrained(target_dir))
    head, to_draft = logit_basis(target_embedding, states, width)
    draft_states = states @ to_draft
    norms = draft_states.norm(dim=1)
    row_norm = float(target_embedding.norm(dim=1).mean())
    draft.lm_head.weight.data.copy_(head)
    if not cfg.draft.tie_word_embeddings:
        draft.get_input_embeddings().weight.data.copy_(draft_states / norms.mean() * row_norm)
    draft.model.norm.weight.data.fill_(float(norms.mean()) / math.sqrt(width))
    return draft


def initial_draft(cfg: RecipeConfig, target_dir: Path) -> LlamaForCausalLM:
    """The draft to train: a trained draft to fine-tune (``train.init_from``, a folder), or a new one."""
    init_from = cfg.train.init_from
    if not init_from:
        return build_draft(cfg, target_dir)
    draft = LlamaForCausalLM.from_pretrained(repo_path(init_from), dtype=torch.float32)
    target_vocab = AutoConfig.from_pretrained(target_dir).vocab_size
    if draft.config.vocab_size != target_vocab:
        raise SystemExit(f"train.init_from {init_from}: vocabulary {draft.config.vocab_size}, "
                         f"the target's {target_vocab}")
    mismatched = {key: (value, getattr(draft.config, key)) for key, value in to_json(cfg.draft).items()
                  if hasattr(draft.config, key) and getattr(draft.config, key) != value}
    if mismatched:
        raise SystemExit(f"train.init_from {init_from} does not match the draft config (config, model): "
                         f"{mismatched}")
    log.info("fine-tuning the draft in %s", init_from)
    return draft
