"""Chat prompts written by the target itself, for training text that is phrased freely.

The template bank (``prompt_bank.py``) covers many kinds of request, but every prompt in it is a template
with slots filled in, so a draft trained only on its answers learns those phrasings and topics well and
freely phrased requests less well. An instruct model has also learned what *users* write: given its chat
template up to the start of a user turn (system turn, then ``<|im_start|>user\\n``), it continues with a
plausible user message and closes it with its end-of-turn token (the "Magpie" idea). Sampling that turn
many times gives varied, natural prompts without any third-party text.

Prompts are filtered: the turn must end within the token limit, be between ``MIN_WORDS`` and ``MAX_WORDS``
words, be distinct from the others, and share no six-word run with a held-out benchmark prompt (nor equal
one), so the benchmark stays held out.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from recipes.distill_draft.heldout_overlap import normalize, shingles
from recipes.distill_draft.recipe_config import SelfPromptConfig

log = logging.getLogger(__name__)

MIN_WORDS = 3
MAX_WORDS = 80
USER_CONTENT_MARK = "\x00user-content\x00"


def user_turn_prefix(tokenizer) -> list[int]:
    """Token ids of a chat formatted by the target's template, up to where the user's message begins."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": USER_CONTENT_MARK}], tokenize=False)
    prefix = text[:text.index(USER_CONTENT_MARK)]
    return tokenizer(prefix, add_special_tokens=False)["input_ids"]


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), restricted to the smallest top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside_nucleus = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def sample_user_turns(target, prefix_ids: list[int], rows: int, max_tokens: int, temperature: float, top_p: float,
                      end_id: int, generator: torch.Generator) -> list[list[int] | None]:
    """``rows`` sampled user turns after ``prefix_ids``; None for a turn that did not end within ``max_tokens``."""
    device = target.device
    cache = DynamicCache()
    input_ids = torch.tensor([prefix_ids], device=device).repeat(rows, 1)
    logits = target(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    tokens = torch.zeros((rows, max_tokens), dtype=torch.long, device=device)
    ends = torch.full((rows,), -1, dtype=torch.long, device=device)
    for step in range(max_tokens):
        next_tokens = sample_top_p(logits, temperature, top_p, generator)
        tokens[:, step] = next_tokens
        ends = torch.where((ends < 0) & (next_tokens == end_id), step, ends)
        if bool((ends >= 0).all()):
            break
        logits = target(input_ids=next_tokens[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
    tokens, ends = tokens.cpu(), ends.tolist()
    return [tokens[row, :end].tolist() if end >= 0 else None for row, end in enumerate(ends)]


class PromptFilter:
    """Keeps a prompt if it is complete, of a sensible length, new, and shares nothing with the held-out set."""

    def __init__(self, heldout_prompts: list[str], known_prompts: list[str] = ()):
        self.heldout_norm = {normalize(p) for p in heldout_prompts}
        self.heldout_shingles = set().union(*(shingles(p) for p in heldout_prompts))
        self.seen: set[str] = {normalize(p) for p in known_prompts}  # e.g. an earlier round's, to stay new

    def accept(self, prompt: str) -> bool:
        norm = normalize(prompt)
        words = len(prompt.split())
        if not MIN_WORDS <= words <= MAX_WORDS or norm in self.seen:
            return False
        if norm in self.heldout_norm or shingles(prompt) & self.heldout_shingles:
            return False
        self.seen.add(norm)
        return True


def write_prompts(target, tokenizer, count: int, heldout_prompts: list[str], settings: SelfPromptConfig, seed: int,
                  known_prompts: list[str] = ()) -> list[str]:
    """``count`` distinct prompts written by the target (the same for the same seed, model and device), none
    equal to one of ``known_prompts``."""
    prefix_ids = user_turn_prefix(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    keep = PromptFilter(heldout_prompts, known_prompts=known_prompts)
    prompts: list[str] = []
    batch_index = 0
    while len(prompts) < count:
        generator = torch.Generator(device=target.device).manual_seed(seed + batch_index)
        turns = sample_user_turns(target, prefix_ids, settings.batch_size, settings.max_tokens,
                                  settings.temperature, settings.top_p, end_id, generator)
        batch_index += 1
        for turn in turns:
            if turn is None:
                continue
            prompt = tokenizer.decode(turn, skip_special_tokens=True).strip()
            if keep.accept(prompt) and len(prompts) < count:
                prompts.append(prompt)
        log.info("self-written prompts: %d of %d after %d batches", len(prompts), count, batch_index)
        if batch_index > 50 and len(prompts) < batch_index * settings.batch_size // 50:
            raise RuntimeError(f"the target writes too few usable prompts: {len(prompts)} in {batch_index} batches")
    return prompts
