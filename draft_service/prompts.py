"""Turning a request's prompt (text or token ids) into the token ids both models see."""

from __future__ import annotations

from duo_common.errors import InvalidArgument

MAX_PROMPT_CHARS = 1_000_000


class PromptEncoder:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def warm_up(self) -> None:
        """Compile the chat template now (about 10 ms at its first use) rather than in front of a first token."""
        if self.has_chat_template:
            self.encode_text("hello", True)

    def encode_text(self, text: str, apply_chat_template: bool | None) -> tuple[int, ...]:
        """Tokenize text, as one user message in the chat template when asked (default: when there is one)."""
        if not text:
            raise InvalidArgument("the prompt is empty: give some text or token ids")
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"the prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        use_chat = self.has_chat_template if apply_chat_template is None else apply_chat_template
        if use_chat:
            if not self.has_chat_template:
                raise InvalidArgument("the chat template was asked for but this tokenizer has none; use --no-chat")
            ids = self._tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = self._tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise InvalidArgument("the prompt tokenizes to nothing")
        return tuple(int(i) for i in ids)

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)
