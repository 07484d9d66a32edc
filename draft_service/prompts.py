"""Turning a request's prompt (text, token ids or chat messages) into the token ids both models see.

The chat template is applied here and nowhere else in the service: chat messages always go through it, a text
prompt as one user message when asked (by default when the tokenizer has a template).
"""

from __future__ import annotations

from jinja2 import TemplateError

from duo.common.errors import InvalidArgument
from duo.common.generation_spec import ChatMessage, ChatPrompt, ChatRole, Prompt, TextPrompt, TokenIdsPrompt
from duo.common.limits import checked_token_ids
from duo.common.prompt_sets import chat_template_ids

MAX_PROMPT_CHARS = 1_000_000  # of a text prompt, and of a chat's messages together
MAX_CHAT_MESSAGES = 4096


class PromptEncoder:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        # No token decodes to more characters than its vocabulary entry has, so a text longer than this many
        # characters per allowed token cannot fit: it is refused before the work of tokenizing it.
        self._max_chars_per_token = max((len(token) for token in tokenizer.get_vocab()), default=1)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def warm_up(self) -> None:
        """Compile the chat template now (about 10 ms at its first use) rather than in front of a first token."""
        if self.has_chat_template:
            self.encode_text("hello", True)

    def encode(self, prompt: Prompt, vocab_size: int, max_tokens: int | None = None) -> tuple[int, ...]:
        """Any kind of prompt as token ids, each within the target's vocabulary; text that could not fit in
        ``max_tokens`` is refused before it is tokenized (the caller checks the exact count)."""
        if isinstance(prompt, TextPrompt):
            self._check_could_fit(len(prompt.text), max_tokens)
            return self.encode_text(prompt.text, prompt.apply_chat_template)
        if isinstance(prompt, ChatPrompt):
            self._check_could_fit(sum(len(message.content) for message in prompt.messages), max_tokens)
            return self.encode_chat(prompt.messages)
        if isinstance(prompt, TokenIdsPrompt):
            if not prompt.ids:
                raise InvalidArgument("the prompt is empty: give some text or token ids")
            return checked_token_ids(prompt.ids, vocab_size, "prompt")
        raise TypeError(f"not a prompt: {prompt!r}")

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
            return self._through_template((ChatMessage(ChatRole.USER, text),))
        return _checked_ids(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: tuple[ChatMessage, ...]) -> tuple[int, ...]:
        """A conversation through the chat template, which then opens the assistant's turn."""
        if not messages:
            raise InvalidArgument("the chat has no messages: give at least one")
        if len(messages) > MAX_CHAT_MESSAGES:
            raise InvalidArgument(f"the chat has {len(messages)} messages; the limit is {MAX_CHAT_MESSAGES}")
        chars = sum(len(message.content) for message in messages)
        if chars > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"the chat's messages have {chars} characters; the limit is {MAX_PROMPT_CHARS}")
        if not self.has_chat_template:
            raise InvalidArgument("this model's tokenizer has no chat template: send text or token ids instead of "
                                  "chat messages")
        return self._through_template(messages)

    def _check_could_fit(self, chars: int, max_tokens: int | None) -> None:
        if max_tokens is not None and chars > max_tokens * self._max_chars_per_token:
            raise InvalidArgument(f"the prompt has {chars} characters: more than {max_tokens} tokens, the most "
                                  "this service takes, can hold")

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def _through_template(self, messages: tuple[ChatMessage, ...]) -> tuple[int, ...]:
        conversation = [{"role": message.role.value, "content": message.content} for message in messages]
        try:
            ids = chat_template_ids(self._tokenizer, conversation)
        except TemplateError as exc:  # e.g. a template that wants user and assistant turns to alternate
            raise InvalidArgument(f"the chat template refused these messages: {exc}") from exc
        return _checked_ids(ids)


def _checked_ids(ids) -> tuple[int, ...]:
    if not ids:
        raise InvalidArgument("the prompt tokenizes to nothing")
    return tuple(int(i) for i in ids)
