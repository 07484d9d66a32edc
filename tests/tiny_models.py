"""Tiny randomly initialised model pairs (Llama and GPT-2 shapes) with a word-level tokenizer, built in
the tests. The draft is the target with small weight noise, so it agrees with the target often but not
always: both acceptance and rejection paths run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 96
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
DEFAULT_EOS = 2
# A chat template in the tiny vocabulary: each message is its role's word, its content and an end-of-turn word.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ {'system': 'w89', 'user': 'w90', 'assistant': 'w91'}[message['role']] }} "
    "{{ message['content'] }} w92 {% endfor %}{% if add_generation_prompt %}w91{% endif %}"
)


def word_tokenizer(vocab_size: int = VOCAB_SIZE, extra_word: str | None = None,
                   chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Words w0, w1, ... after three special tokens; ``extra_word`` renames the last word (another tokenizer)."""
    vocab = dict(SPECIALS)
    for index in range(vocab_size - len(SPECIALS)):
        vocab[f"w{index}"] = index + len(SPECIALS)
    if extra_word is not None:
        last = max(vocab, key=vocab.get)
        vocab[extra_word] = vocab.pop(last)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=chat_template)


def build_model(arch: str, seed: int = 0, context: int = 256) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=context, initializer_range=1.0,
            bos_token_id=1, eos_token_id=DEFAULT_EOS, pad_token_id=0,
        )
        return LlamaForCausalLM(config).eval()
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=context, initializer_range=1.0,
            bos_token_id=1, eos_token_id=DEFAULT_EOS, pad_token_id=0,
        )
        return GPT2LMHeadModel(config).eval()
    raise ValueError(arch)


def perturbed_copy(model: torch.nn.Module, noise: float, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    draft = type(model)(model.config).eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return draft


NOISE = {"llama": 0.01, "gpt2": 0.03}  # about 60 % greedy agreement with the target


@dataclass(frozen=True)
class ModelPair:
    target_dir: Path
    draft_dir: Path
    target: torch.nn.Module


def save_pair(root: Path, target_arch: str, draft_arch: str | None = None, eos_token_id: int = DEFAULT_EOS,
              draft_tokenizer: PreTrainedTokenizerFast | None = None, context: int = 256,
              chat_template: str | None = None) -> ModelPair:
    """Save a target and its perturbed draft (same architecture unless ``draft_arch``) with a tokenizer (with
    ``chat_template``, e.g. CHAT_TEMPLATE; the tiny tokenizer has none by default)."""
    target = build_model(target_arch, context=context)
    if draft_arch is None or draft_arch == target_arch:
        draft = perturbed_copy(target, NOISE[target_arch])
    else:
        draft = build_model(draft_arch, seed=7, context=context)
    tokenizer = word_tokenizer(chat_template=chat_template)
    for model, name, tok in ((target, "target", tokenizer), (draft, "draft", draft_tokenizer or tokenizer)):
        model.generation_config.eos_token_id = eos_token_id
        model.generation_config.pad_token_id = 0
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return ModelPair(root / "target", root / "draft", target)


def reference_greedy(target: torch.nn.Module, prompt: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """HF generate of the target alone, greedy: what duo must reproduce token for token."""
    with torch.inference_mode():
        output = target.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_token_id, pad_token_id=0,
        )
    return output[0, len(prompt):].tolist()


def reference_seeded(target: torch.nn.Module, prompt: list[int], max_new_tokens: int, params) -> list[int]:
    """The target alone sampling with ``params`` (a seed): each token the exponential race of the target's
    distribution on the noise of its position. What duo must reproduce token for token, whatever it drafts."""
    from duo.common.sampling import logits_to_probs, race, race_noise

    sequence = list(prompt)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            probs = logits_to_probs(target(input_ids=torch.tensor([sequence])).logits[0, -1], params)
            sequence.append(int(race(probs, race_noise(params.seed, len(sequence), probs.shape[-1]))))
    return sequence[len(prompt):]
