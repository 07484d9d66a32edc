from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]

class BudgetSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_SOURCE_UNSPECIFIED: _ClassVar[BudgetSource]
    BUDGET_SOURCE_REQUEST: _ClassVar[BudgetSource]
    BUDGET_SOURCE_CLIENT: _ClassVar[BudgetSource]
    BUDGET_SOURCE_SERVICE: _ClassVar[BudgetSource]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason
BUDGET_SOURCE_UNSPECIFIED: BudgetSource
BUDGET_SOURCE_REQUEST: BudgetSource
BUDGET_SOURCE_CLIENT: BudgetSource
BUDGET_SOURCE_SERVICE: BudgetSource

class DecodingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class StoppingParams(_message.Message):
    __slots__ = ("max_new_tokens", "stop_strings", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop_strings: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class TokenTree(_message.Message):
    __slots__ = ("token_ids", "parent_indices", "draft_distributions")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_INDICES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    parent_indices: _containers.RepeatedScalarFieldContainer[int]
    draft_distributions: _containers.RepeatedCompositeFieldContainer[DraftDistribution]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., parent_indices: _Optional[_Iterable[int]] = ..., draft_distributions: _Optional[_Iterable[_Union[DraftDistribution, _Mapping]]] = ...) -> None: ...

class DraftDistribution(_message.Message):
    __slots__ = ("probs_f32",)
    PROBS_F32_FIELD_NUMBER: _ClassVar[int]
    probs_f32: bytes
    def __init__(self, probs_f32: _Optional[bytes] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "vocab_size", "tokenizer_fingerprint", "eos_token_ids", "max_context_tokens", "device", "dtype", "max_tree_nodes", "tree_attention")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    TREE_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_context_tokens: int
    device: str
    dtype: str
    max_tree_nodes: int
    tree_attention: bool
    def __init__(self, model_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., max_context_tokens: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., max_tree_nodes: _Optional[int] = ..., tree_attention: _Optional[bool] = ...) -> None: ...

class RoundTimings(_message.Message):
    __slots__ = ("draft_compute_s", "verify_compute_s", "verify_round_trip_s", "proposal_size", "accepted_size", "draft_tokens", "proposal_depth", "draft_ahead_s", "verify_batch_sessions", "verify_batch_tokens", "verify_queue_s")
    DRAFT_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_ROUND_TRIP_S_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_AHEAD_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    draft_compute_s: float
    verify_compute_s: float
    verify_round_trip_s: float
    proposal_size: int
    accepted_size: int
    draft_tokens: int
    proposal_depth: int
    draft_ahead_s: float
    verify_batch_sessions: int
    verify_batch_tokens: int
    verify_queue_s: float
    def __init__(self, draft_compute_s: _Optional[float] = ..., verify_compute_s: _Optional[float] = ..., verify_round_trip_s: _Optional[float] = ..., proposal_size: _Optional[int] = ..., accepted_size: _Optional[int] = ..., draft_tokens: _Optional[int] = ..., proposal_depth: _Optional[int] = ..., draft_ahead_s: _Optional[float] = ..., verify_batch_sessions: _Optional[int] = ..., verify_batch_tokens: _Optional[int] = ..., verify_queue_s: _Optional[float] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("open", "proposal")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    open: VerifyOpen
    proposal: Proposal
    def __init__(self, open: _Optional[_Union[VerifyOpen, _Mapping]] = ..., proposal: _Optional[_Union[Proposal, _Mapping]] = ...) -> None: ...

class VerifyOpen(_message.Message):
    __slots__ = ("session_id", "prompt_token_ids", "decoding", "draft_tokenizer_fingerprint")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    decoding: DecodingParams
    draft_tokenizer_fingerprint: str
    def __init__(self, session_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., decoding: _Optional[_Union[DecodingParams, _Mapping]] = ..., draft_tokenizer_fingerprint: _Optional[str] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("round", "tree")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    round: int
    tree: TokenTree
    def __init__(self, round: _Optional[int] = ..., tree: _Optional[_Union[TokenTree, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("prefilled", "verdict")
    PREFILLED_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    prefilled: Prefilled
    verdict: Verdict
    def __init__(self, prefilled: _Optional[_Union[Prefilled, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class Prefilled(_message.Message):
    __slots__ = ("first_token_id", "compute_s", "queue_s")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    compute_s: float
    queue_s: float
    def __init__(self, first_token_id: _Optional[int] = ..., compute_s: _Optional[float] = ..., queue_s: _Optional[float] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("round", "accepted_node_indices", "next_token_id", "compute_s", "batch_sessions", "batch_tokens", "queue_s")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_NODE_INDICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted_node_indices: _containers.RepeatedScalarFieldContainer[int]
    next_token_id: int
    compute_s: float
    batch_sessions: int
    batch_tokens: int
    queue_s: float
    def __init__(self, round: _Optional[int] = ..., accepted_node_indices: _Optional[_Iterable[int]] = ..., next_token_id: _Optional[int] = ..., compute_s: _Optional[float] = ..., batch_sessions: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("start", "budget")
    START_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    start: GenerateRequest
    budget: BudgetUpdate
    def __init__(self, start: _Optional[_Union[GenerateRequest, _Mapping]] = ..., budget: _Optional[_Union[BudgetUpdate, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "messages", "apply_chat_template", "decoding", "stopping", "budget", "request_id", "sequential", "continuation")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    APPLY_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    messages: ChatMessages
    apply_chat_template: bool
    decoding: DecodingParams
    stopping: StoppingParams
    budget: DraftBudget
    request_id: str
    sequential: bool
    continuation: Continuation
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., apply_chat_template: _Optional[bool] = ..., decoding: _Optional[_Union[DecodingParams, _Mapping]] = ..., stopping: _Optional[_Union[StoppingParams, _Mapping]] = ..., budget: _Optional[_Union[DraftBudget, _Mapping]] = ..., request_id: _Optional[str] = ..., sequential: _Optional[bool] = ..., continuation: _Optional[_Union[Continuation, _Mapping]] = ...) -> None: ...

class Continuation(_message.Message):
    __slots__ = ("delivered_token_ids",)
    DELIVERED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    delivered_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, delivered_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class DraftBudget(_message.Message):
    __slots__ = ("max_draft_tokens", "max_branches")
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    max_draft_tokens: int
    max_branches: int
    def __init__(self, max_draft_tokens: _Optional[int] = ..., max_branches: _Optional[int] = ...) -> None: ...

class BudgetUpdate(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: DraftBudget
    def __init__(self, budget: _Optional[_Union[DraftBudget, _Mapping]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("started", "committed", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: Started
    committed: Committed
    finished: Finished
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., committed: _Optional[_Union[Committed, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("request_id", "prompt_tokens", "budget")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_tokens: int
    budget: DraftBudget
    def __init__(self, request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., budget: _Optional[_Union[DraftBudget, _Mapping]] = ...) -> None: ...

class Committed(_message.Message):
    __slots__ = ("token_ids", "text_delta", "timings")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text_delta: str
    timings: RoundTimings
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text_delta: _Optional[str] = ..., timings: _Optional[_Union[RoundTimings, _Mapping]] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason", "text", "stats")
    REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    text: str
    stats: GenerationStats
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., text: _Optional[str] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("prompt_tokens", "new_tokens", "ttft_s", "total_s", "rounds", "drafted_tokens", "accepted_tokens", "draft_compute_s", "verify_compute_s", "verify_round_trip_s", "final_draft_budget", "first_token", "draft_budget_source", "verifier_resumes")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_ROUND_TRIP_S_FIELD_NUMBER: _ClassVar[int]
    FINAL_DRAFT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_BUDGET_SOURCE_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_RESUMES_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    total_s: float
    rounds: int
    drafted_tokens: int
    accepted_tokens: int
    draft_compute_s: float
    verify_compute_s: float
    verify_round_trip_s: float
    final_draft_budget: int
    first_token: FirstTokenTimes
    draft_budget_source: BudgetSource
    verifier_resumes: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., total_s: _Optional[float] = ..., rounds: _Optional[int] = ..., drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., draft_compute_s: _Optional[float] = ..., verify_compute_s: _Optional[float] = ..., verify_round_trip_s: _Optional[float] = ..., final_draft_budget: _Optional[int] = ..., first_token: _Optional[_Union[FirstTokenTimes, _Mapping]] = ..., draft_budget_source: _Optional[_Union[BudgetSource, str]] = ..., verifier_resumes: _Optional[int] = ...) -> None: ...

class FirstTokenTimes(_message.Message):
    __slots__ = ("tokenize_s", "model_info_s", "verifier_queue_s", "prefill_s", "verifier_link_s")
    TOKENIZE_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_INFO_S_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    VERIFIER_LINK_S_FIELD_NUMBER: _ClassVar[int]
    tokenize_s: float
    model_info_s: float
    verifier_queue_s: float
    prefill_s: float
    verifier_link_s: float
    def __init__(self, tokenize_s: _Optional[float] = ..., model_info_s: _Optional[float] = ..., verifier_queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., verifier_link_s: _Optional[float] = ...) -> None: ...
