"""The one place where protobuf messages become duo's dataclasses and back.

Everything beneath the servicers speaks dataclasses; these functions also validate what arrives from
outside (raising InvalidArgument with a message a caller can act on).
"""

from __future__ import annotations

from dataclasses import asdict, fields

import numpy as np

from duo.common.errors import InvalidArgument
from duo.common.events import (BudgetSource, CommittedEvent, FinishedEvent, FirstTokenTimes, GenerationEvent,
                               RoundTimings, SessionStats)
from duo.common.generation_spec import (ChatMessage, ChatPrompt, ChatRole, GenerationSpec, Prompt,
                                        RequestedBudget, TextPrompt, TokenIdsPrompt)
from duo.common.models import ModelInfo
from duo.common.params import DecodingParams, StoppingParams
from duo.common.stopping import FinishReason
from duo.common.tree import TokenTree
from duo.protos import duo_pb2 as pb

_FINISH_TO_PB = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
}
_FINISH_FROM_PB = {value: key for key, value in _FINISH_TO_PB.items()}
_BUDGET_SOURCE_TO_PB = {
    None: pb.BUDGET_SOURCE_UNSPECIFIED,
    BudgetSource.REQUEST: pb.BUDGET_SOURCE_REQUEST,
    BudgetSource.CLIENT: pb.BUDGET_SOURCE_CLIENT,
    BudgetSource.SERVICE: pb.BUDGET_SOURCE_SERVICE,
}
_BUDGET_SOURCE_FROM_PB = {value: key for key, value in _BUDGET_SOURCE_TO_PB.items()}


def decoding_from_pb(message: pb.DecodingParams) -> DecodingParams:
    return DecodingParams(
        temperature=float(message.temperature),
        top_k=int(message.top_k),
        top_p=float(message.top_p) if message.top_p != 0 else 1.0,  # unset (0) is off; NaN or < 0 is refused
        seed=int(message.seed) if message.HasField("seed") else None,
    )


def decoding_to_pb(params: DecodingParams) -> pb.DecodingParams:
    message = pb.DecodingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        message.seed = params.seed
    return message


def stopping_from_pb(message: pb.StoppingParams) -> StoppingParams:
    return StoppingParams(
        max_new_tokens=int(message.max_new_tokens),
        stop_strings=tuple(message.stop_strings),
        ignore_eos=bool(message.ignore_eos),
    )


def stopping_to_pb(params: StoppingParams) -> pb.StoppingParams:
    return pb.StoppingParams(
        max_new_tokens=params.max_new_tokens, stop_strings=list(params.stop_strings), ignore_eos=params.ignore_eos
    )


DISTRIBUTION_SUM_TOLERANCE = 1e-3  # float32 sums over a vocabulary of 50k ids stray by about 1e-5


def tree_from_pb(message: pb.TokenTree, vocab_size: int, max_nodes: int | None = None) -> TokenTree:
    """Decode a proposal tree; the caller validates its shape against its own limits. A tree larger than
    ``max_nodes`` is refused before its distributions are decoded."""
    import torch  # here, not at the top: a client converts plain values without torch

    if max_nodes is not None and len(message.token_ids) > max_nodes:
        raise InvalidArgument(
            f"the proposal has {len(message.token_ids)} nodes; this verifier takes at most {max_nodes}")
    draft_probs = None
    if message.draft_distributions:
        if len(message.draft_distributions) != len(message.token_ids):
            raise InvalidArgument(
                f"{len(message.draft_distributions)} draft distributions for {len(message.token_ids)} nodes"
            )
        expected_bytes = vocab_size * 4
        rows = []
        for index, distribution in enumerate(message.draft_distributions):
            if len(distribution.probs_f32) != expected_bytes:
                raise InvalidArgument(
                    f"node {index}: draft distribution has {len(distribution.probs_f32)} bytes, expected "
                    f"{expected_bytes} (vocab {vocab_size} float32)"
                )
            rows.append(np.frombuffer(distribution.probs_f32, dtype="<f4"))
        draft_probs = torch.from_numpy(np.stack(rows).copy())
        if not torch.isfinite(draft_probs).all() or (draft_probs < 0).any():
            raise InvalidArgument("draft distributions must be finite and non-negative")
        sums = draft_probs.sum(dim=-1, dtype=torch.float64)
        off = ((sums - 1).abs() > DISTRIBUTION_SUM_TOLERANCE).nonzero().flatten().tolist()
        if off:
            raise InvalidArgument(
                f"draft distributions must sum to 1: node {off[0]}'s sums to {float(sums[off[0]]):.6g}"
            )
    return TokenTree(tuple(message.token_ids), tuple(message.parent_indices), draft_probs)


def tree_to_pb(tree: TokenTree) -> pb.TokenTree:
    import torch

    message = pb.TokenTree(token_ids=list(tree.token_ids), parent_indices=list(tree.parents))
    if tree.draft_probs is not None:
        for row in tree.draft_probs.to(torch.float32).cpu().numpy().astype("<f4"):
            message.draft_distributions.add(probs_f32=row.tobytes())
    return message


def model_info_to_pb(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**asdict(info))  # the message's fields are the dataclass's, name for name


def model_info_from_pb(message: pb.ModelInfo) -> ModelInfo:
    values = {name: getattr(message, name) for name in _fields(ModelInfo)}
    return ModelInfo(**values | {"eos_token_ids": tuple(message.eos_token_ids)})


def finish_reason_to_pb(reason: FinishReason) -> int:
    return _FINISH_TO_PB[reason]


def finish_reason_from_pb(value: int) -> FinishReason:
    if value not in _FINISH_FROM_PB:
        raise InvalidArgument(f"unknown finish reason {value}")
    return _FINISH_FROM_PB[value]


MAX_REQUEST_ID_CHARS = 128


def request_id_from_pb(value: str) -> str | None:
    """A caller's id for logs: None when unset; printable ASCII without spaces, at most 128 characters (it
    goes into log lines as sent, so a newline in it would forge one)."""
    if not value:
        return None
    if len(value) > MAX_REQUEST_ID_CHARS or not all(33 <= ord(char) <= 126 for char in value):
        raise InvalidArgument(
            f"request ids are 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces "
            f"(got one of {len(value)} characters)"
        )
    return value


def generation_spec_from_pb(message: pb.GenerateRequest) -> GenerationSpec:
    """A GenerateRequest as the draft service's sessions take it; the service checks the prompt against its
    limits and the target's vocabulary."""
    budget = None
    if message.HasField("budget"):
        budget = RequestedBudget(message.budget.max_draft_tokens, message.budget.max_branches)
    return GenerationSpec(
        prompt=_prompt_from_pb(message),
        decoding=decoding_from_pb(message.decoding),
        stopping=stopping_from_pb(message.stopping),
        budget=budget,
        request_id=request_id_from_pb(message.request_id),
        sequential=message.sequential,
        continue_after=tuple(message.continuation.delivered_token_ids),
    )


def _prompt_from_pb(message: pb.GenerateRequest) -> Prompt:
    kind = message.WhichOneof("prompt")
    chat = message.apply_chat_template if message.HasField("apply_chat_template") else None
    if kind == "text":
        return TextPrompt(message.text, chat)
    if kind == "token_ids":
        return TokenIdsPrompt(tuple(message.token_ids.ids))
    if kind == "messages":
        if chat is False:
            raise InvalidArgument("chat messages always go through the chat template: do not set "
                                  "apply_chat_template to false (send text or token ids instead)")
        return ChatPrompt(chat_from_pb(message.messages))
    raise InvalidArgument("the prompt is missing: set text, token_ids or messages")


def chat_from_pb(message: pb.ChatMessages) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(ChatRole.parse(item.role, f"message {index}"), item.content)
                 for index, item in enumerate(message.messages))


def chat_to_pb(messages: tuple[ChatMessage, ...]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=item.role.value, content=item.content) for item in messages])


def event_to_pb(event: GenerationEvent) -> pb.GenerateEvent:
    if isinstance(event, CommittedEvent):
        message = pb.Committed(token_ids=list(event.token_ids), text_delta=event.text_delta)
        if event.timings is not None:
            message.timings.CopyFrom(pb.RoundTimings(**asdict(event.timings)))
        return pb.GenerateEvent(committed=message)
    stats = asdict(event.stats)
    stats["first_token"] = pb.FirstTokenTimes(**stats["first_token"])
    stats["draft_budget_source"] = _BUDGET_SOURCE_TO_PB[event.stats.draft_budget_source]
    return pb.GenerateEvent(finished=pb.Finished(
        reason=finish_reason_to_pb(event.reason), text=event.text, stats=pb.GenerationStats(**stats)))


def event_from_pb(message: pb.GenerateEvent) -> GenerationEvent | None:
    """A stream event as a dataclass; None for Started (its content is read from ``started_from_pb``)."""
    kind = message.WhichOneof("event")
    if kind == "committed":
        committed = message.committed
        timings = None
        if committed.HasField("timings"):
            timings = RoundTimings(**{name: getattr(committed.timings, name) for name in _fields(RoundTimings)})
        return CommittedEvent(tuple(committed.token_ids), committed.text_delta, timings)
    if kind == "finished":
        finished = message.finished
        stats = SessionStats(**{name: getattr(finished.stats, name) for name in _fields(SessionStats)})
        stats.first_token = FirstTokenTimes(**{name: getattr(finished.stats.first_token, name)
                                               for name in _fields(FirstTokenTimes)})
        stats.draft_budget_source = _BUDGET_SOURCE_FROM_PB.get(finished.stats.draft_budget_source)  # newer: None
        return FinishedEvent(finish_reason_from_pb(finished.reason), finished.text, stats)
    return None


def _fields(cls) -> list[str]:
    return [item.name for item in fields(cls)]
