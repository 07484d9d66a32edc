"""What a caller asks of the draft service for one generation, as dataclasses, whatever the transport: the
gRPC codec (``duo.common.codec``) and the HTTP API's translation (``duo.draft_service.openai_codec``) both decode
into these, and the draft service's session machinery (``duo.draft_service.session_factory``) takes them.

A prompt is one of three kinds: text (tokenized by the service, optionally as one user message of the chat
template), token ids, or chat messages (always through the chat template). Limits that depend on the
service (prompt size, the target's vocabulary and context) are checked there, not here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from duo.common.errors import InvalidArgument
from duo.common.params import DecodingParams, StoppingParams


class ChatRole(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"

    @classmethod
    def parse(cls, value: str, where: str) -> ChatRole:
        try:
            return cls(value)
        except ValueError:
            raise InvalidArgument(f"{where}: role {value!r} is not one of "
                                  f"{', '.join(role.value for role in cls)}") from None


@dataclass(frozen=True)
class ChatMessage:
    role: ChatRole
    content: str


@dataclass(frozen=True)
class TextPrompt:
    text: str
    apply_chat_template: bool | None = None  # None: when the tokenizer has a chat template


@dataclass(frozen=True)
class TokenIdsPrompt:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[ChatMessage, ...]


Prompt = TextPrompt | TokenIdsPrompt | ChatPrompt


@dataclass(frozen=True)
class RequestedBudget:
    """A budget the caller fixes: draft tokens per round, and tree width (0 or 1: chains)."""

    max_draft_tokens: int
    max_branches: int = 1


@dataclass(frozen=True)
class GenerationSpec:
    prompt: Prompt
    decoding: DecodingParams = DecodingParams()
    stopping: StoppingParams = StoppingParams()
    budget: RequestedBudget | None = None  # None: the service chooses (its latency-aware controller)
    request_id: str | None = None  # the caller's id for logs; None: the service makes one
    sequential: bool = False  # benchmarks: draft only after each verdict
    # tokens an earlier call of this request delivered before its draft service was lost: the generation goes
    # on after them (they count toward stop strings and max_new_tokens) and streams only what follows
    continue_after: tuple[int, ...] = ()
