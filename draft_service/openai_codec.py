"""The one place where the HTTP API's OpenAI-shaped JSON becomes duo's dataclasses and back, as
``duo.common.codec`` is for protobuf. Pure: bodies in, dataclasses out, and the reverse; no I/O.

Requests are checked field by field: a field duo does not implement is refused with a 400 that names it,
never ignored, unless it is set to the value that asks for nothing (``n: 1``, ``presence_penalty: 0``…) or
only identifies the caller (``user``). Two extensions that vLLM's server also takes are honoured: ``top_k``
and ``ignore_eos``. OpenAI's own defaults hold where duo's gRPC API differs: temperature 1 (sampling), and
``max_tokens`` 16 for completions; a chat runs to the service's ``max_new_tokens`` limit or the context.
Responses carry duo's own numbers in a ``duo`` object, leaving the OpenAI shape as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from duo.common.errors import DuoError, InvalidArgument, UpstreamError
from duo.common.events import FinishedEvent, SessionStats
from duo.common.generation_spec import (ChatMessage, ChatPrompt, ChatRole, GenerationSpec, Prompt, TextPrompt,
                                        TokenIdsPrompt)
from duo.common.params import DecodingParams, StoppingParams
from duo.common.stopping import FinishReason

OPENAI_DEFAULT_TEMPERATURE = 1.0
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

_SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                    "top_k", "ignore_eos"}
CHAT_FIELDS = frozenset(_SAMPLING_FIELDS | {"messages", "max_completion_tokens"})
COMPLETION_FIELDS = frozenset(_SAMPLING_FIELDS | {"prompt"})
# Fields duo does not implement, accepted only where they ask for nothing.
_INERT_VALUES: dict[str, tuple] = {"n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
                                   "logprobs": (False,), "echo": (False,), "best_of": (1,)}
_CALLER_IDS = frozenset({"user", "safety_identifier", "prompt_cache_key"})  # only name the caller: nothing to do
# "developer" is OpenAI's newer name for the system role.
_ROLES = {"system": ChatRole.SYSTEM, "developer": ChatRole.SYSTEM, "user": ChatRole.USER,
          "assistant": ChatRole.ASSISTANT}


class InvalidField(InvalidArgument):
    """A bad request that names the field at fault (OpenAI's ``param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ApiCall:
    """One decoded completions or chat request."""

    spec: GenerationSpec
    model: str | None  # the model asked for; None: whichever this service runs
    stream: bool
    include_usage: bool  # streaming: a last chunk with the usage


# ───────────────────────────── requests ─────────────────────────────

def chat_request(body: Any, default_max_tokens: int) -> ApiCall:
    """A ``POST /v1/chat/completions`` body; it runs to ``default_max_tokens`` when it sets no limit."""
    fields = _checked_fields(body, CHAT_FIELDS)
    max_tokens = _optional(fields, "max_tokens", _positive_int)
    max_completion_tokens = _optional(fields, "max_completion_tokens", _positive_int)
    if None not in (max_tokens, max_completion_tokens) and max_tokens != max_completion_tokens:
        raise InvalidField("max_completion_tokens", "max_tokens and max_completion_tokens disagree: give one")
    limit = max_completion_tokens or max_tokens or default_max_tokens
    return _call(fields, ChatPrompt(_messages(fields.get("messages"))), limit)


def completion_request(body: Any) -> ApiCall:
    """A ``POST /v1/completions`` body: the prompt is raw text (no chat template) or token ids."""
    fields = _checked_fields(body, COMPLETION_FIELDS)
    limit = _optional(fields, "max_tokens", _positive_int) or COMPLETIONS_DEFAULT_MAX_TOKENS
    return _call(fields, _completion_prompt(fields.get("prompt")), limit)


def _call(fields: dict, prompt: Prompt, max_tokens: int) -> ApiCall:
    stream = bool(_optional(fields, "stream", _boolean))
    options = _optional(fields, "stream_options", _object)
    if options is not None and not stream:
        raise InvalidField("stream_options", "stream_options is only allowed with stream: true")
    include_usage = False
    if options:
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise InvalidField(f"stream_options.{unknown[0]}", f"stream_options.{unknown[0]} is not supported "
                                                               "(duo takes include_usage)")
        include_usage = bool(_optional(options, "include_usage", _boolean, "stream_options.include_usage"))
    temperature = _optional(fields, "temperature", _number)
    top_p = _optional(fields, "top_p", _number)
    decoding = _params(DecodingParams, "temperature", dict(
        temperature=OPENAI_DEFAULT_TEMPERATURE if temperature is None else float(temperature),
        top_k=max(_optional(fields, "top_k", _integer) or 0, 0),  # vLLM's -1 is off too
        top_p=1.0 if top_p is None else float(top_p),
        seed=_optional(fields, "seed", _integer),
    ))
    stopping = _params(StoppingParams, "stop", dict(
        max_new_tokens=max_tokens,
        stop_strings=_stop_strings(fields.get("stop")),
        ignore_eos=bool(_optional(fields, "ignore_eos", _boolean)),
    ))
    model = _optional(fields, "model", _string)
    return ApiCall(GenerationSpec(prompt, decoding, stopping), model, stream, include_usage)


def _checked_fields(body: Any, allowed: frozenset[str]) -> dict:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    for name, value in body.items():
        if name in allowed or name in _CALLER_IDS or value is None:
            continue
        if name in _INERT_VALUES:
            if _is_inert(value, _INERT_VALUES[name]):
                continue
            raise InvalidField(name, f"{name} = {_shown(value)} is not supported: duo takes only "
                                     f"{_shown(_INERT_VALUES[name][0])}")
        raise InvalidField(name, f"{name} is not supported by duo's API (it takes: {', '.join(sorted(allowed))})")
    return body


def _is_inert(value: Any, inert_values: tuple) -> bool:
    """Whether ``value`` is one that asks for nothing (0.0 is 0, but false is not 0)."""
    return any(value == inert and isinstance(value, bool) == isinstance(inert, bool) for inert in inert_values)


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidField("messages", "messages must be a non-empty list of {role, content} objects")
    messages = []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise InvalidField(where, f"{where} must be an object with a role and a content")
        extra = sorted(set(item) - {"role", "content"})
        if extra:
            raise InvalidField(f"{where}.{extra[0]}", f"{where}.{extra[0]} is not supported (duo takes role and "
                                                      "content)")
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidField(f"{where}.role", f"{where}.role {_shown(role)} is not supported: use "
                                                f"{', '.join(_ROLES)}")
        messages.append(ChatMessage(_ROLES[role], _content(item.get("content"), f"{where}.content")))
    return tuple(messages)


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidField(f"{where}[{index}]", f"{where}[{index}] is not supported: duo takes only "
                                                        "{\"type\": \"text\", \"text\": ...} parts")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidField(where, f"{where} must be a string or a list of text parts")


def _completion_prompt(value: Any) -> Prompt:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return TextPrompt(value, apply_chat_template=False)
    if isinstance(value, list) and value and all(_is_int(item) for item in value):
        return TokenIdsPrompt(tuple(value))
    if isinstance(value, list) and value and all(isinstance(item, (str, list)) for item in value):
        raise InvalidField("prompt", f"batches of prompts are not supported ({len(value)} prompts): send one "
                                     "prompt per request")
    raise InvalidField("prompt", "prompt must be a string or a non-empty list of token ids")


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise InvalidField("stop", "stop must be a string or a list of strings")


def _params(cls, param: str, values: dict):
    """Build DecodingParams or StoppingParams, naming ``param`` where they refuse (their message says which)."""
    try:
        return cls(**values)
    except InvalidArgument as exc:
        field = next((name for name in values if str(exc).startswith(name)), param)
        raise InvalidField(field, str(exc)) from exc


def _optional(fields: dict, name: str, check, where: str | None = None):
    value = fields.get(name)
    return None if value is None else check(value, where or name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no integer


def _json_kind(kind: str, accepts: Callable[[Any], bool]) -> Callable[[Any, str], Any]:
    """A check that a JSON value is ``kind`` (as the refusal says it): ``check(value, name)`` returns it."""
    def check(value: Any, name: str) -> Any:
        if not accepts(value):
            raise InvalidField(name, f"{name} must be {kind}, got {_shown(value)}")
        return value
    return check


_integer = _json_kind("an integer", _is_int)
_number = _json_kind("a number", lambda value: _is_int(value) or isinstance(value, float))
_boolean = _json_kind("true or false", lambda value: isinstance(value, bool))
_string = _json_kind("a string", lambda value: isinstance(value, str))
_object = _json_kind("an object", lambda value: isinstance(value, dict))


def _positive_int(value: Any, name: str) -> int:
    if _integer(value, name) < 1:
        raise InvalidField(name, f"{name} must be at least 1, got {value}")
    return value


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# ───────────────────────────── responses ─────────────────────────────

@dataclass(frozen=True)
class ResponseHead:
    """What every body of one response repeats."""

    id: str
    created: int  # Unix seconds
    model: str
    chat: bool  # /v1/chat/completions (else /v1/completions)


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's two reasons: an end-of-sequence token and a stop string both stop."""
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage(stats: SessionStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens}


def duo_extras(stats: SessionStats) -> dict:
    """duo's own numbers of one generation: speculation and who chose the draft budget."""
    return {
        "rounds": stats.rounds,
        "tokens_per_round": round(stats.tokens_per_round, 4),
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "draft_budget": stats.final_draft_budget,
        "draft_budget_source": stats.draft_budget_source.value if stats.draft_budget_source else None,
        "ttft_s": round(stats.ttft_s, 4),
        "total_s": round(stats.total_s, 4),
    }


def response(head: ResponseHead, finished: FinishedEvent) -> dict:
    """The whole answer of a request without ``stream``."""
    if head.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": finished.text}, "logprobs": None,
                  "finish_reason": finish_reason(finished.reason)}
    else:
        choice = {"index": 0, "text": finished.text, "logprobs": None, "finish_reason": finish_reason(finished.reason)}
    return {**_envelope(head, "chat.completion" if head.chat else "text_completion"), "choices": [choice],
            "usage": usage(finished.stats), "duo": duo_extras(finished.stats)}


def stream_opening(head: ResponseHead) -> list[dict]:
    """The chunks before any text: a chat's first chunk names the assistant's role."""
    return [_chunk(head, {"role": "assistant", "content": ""})] if head.chat else []


def stream_text(head: ResponseHead, text: str) -> dict:
    return _chunk(head, {"content": text} if head.chat else text)


def stream_finish(head: ResponseHead, finished: FinishedEvent, include_usage: bool) -> list[dict]:
    """The last chunks: the finish reason with duo's numbers, then the usage when asked for."""
    last = _chunk(head, {} if head.chat else "", finish_reason(finished.reason))
    last["duo"] = duo_extras(finished.stats)
    if not include_usage:
        return [last]
    last["usage"] = None
    return [last, {**_envelope(head, _chunk_object(head)), "choices": [], "usage": usage(finished.stats)}]


def stream_error(exc: BaseException) -> dict:
    """An error after the stream has started (the status is sent already): an error event, then the end."""
    return error_body(exc)[1]


def _chunk(head: ResponseHead, delta: dict | str, reason: str | None = None) -> dict:
    if head.chat:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
    return {**_envelope(head, _chunk_object(head)), "choices": [choice]}


def _chunk_object(head: ResponseHead) -> str:
    return "chat.completion.chunk" if head.chat else "text_completion"


def _envelope(head: ResponseHead, kind: str) -> dict:
    return {"id": head.id, "object": kind, "created": head.created, "model": head.model}


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "duo"}]}


# ───────────────────────────── errors ─────────────────────────────

class ApiError(Exception):
    """A refusal of the HTTP API itself (authentication, an unknown model or route)."""

    def __init__(self, http_status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.http_status, self.kind, self.code, self.param = http_status, kind, code, param


# gRPC status name → HTTP status and OpenAI error type
_BY_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "CANCELLED": (499, "cancelled"),  # the caller has gone: nobody reads it
}
_UPSTREAM_PASSED_ON = {"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}  # the verifier's, to the caller


def error_body(exc: BaseException) -> tuple[int, dict]:
    """The HTTP status and OpenAI-shaped body ``{"error": {message, type, param, code}}`` of a failure."""
    if isinstance(exc, ApiError):
        return exc.http_status, _error(str(exc), exc.kind, exc.code, exc.param)
    if isinstance(exc, UpstreamError) and exc.status not in _UPSTREAM_PASSED_ON:
        return 502, _error(str(exc), "server_error", exc.status.lower())
    if isinstance(exc, DuoError):
        http_status, kind = _BY_STATUS.get(exc.status, (500, "server_error"))
        return http_status, _error(str(exc), kind, exc.status.lower(), getattr(exc, "param", None))
    return 500, _error(f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal")


def _error(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
