"""Prompt sets as the bench, the benchmarks and the draft recipe read them, and the one way they put a prompt
through a tokenizer's chat template.

A prompt file is JSON Lines, one object per line with a ``"prompt"`` string; blank lines are skipped."""

from __future__ import annotations

import json
from pathlib import Path


def read_prompt_file(path: Path, limit: int | None = None) -> list[str]:
    """The prompts of a JSONL file in order, the first ``limit`` of them when given. A line that is not an
    object with a string ``"prompt"`` is an error naming the file and line."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a JSON object with a \"prompt\" ({exc})") from exc
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: \"prompt\" is not a string")
        prompts.append(prompt)
        if limit is not None and len(prompts) == limit:
            break
    return prompts


def chat_template_ids(tokenizer, conversation: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation (``[{"role": ..., "content": ...}]``) through the tokenizer's chat template,
    ending with the opening of the assistant's turn."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    if hasattr(ids, "keys"):  # some tokenizers answer a BatchEncoding whatever return_dict says
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def user_prompt_ids(tokenizer, text: str, chat: bool = True) -> list[int]:
    """A prompt as the target sees it: one user message through the chat template when ``chat`` and the
    tokenizer has one, else the plain text tokenized with the tokenizer's special tokens."""
    if chat and getattr(tokenizer, "chat_template", None):
        return chat_template_ids(tokenizer, [{"role": "user", "content": text}])
    return [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]
