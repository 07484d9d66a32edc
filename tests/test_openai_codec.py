"""The HTTP API's translation (draft_service/openai_codec.py), without a server: what an OpenAI-shaped body
asks for, what is refused (by name), and the shapes and statuses that go back."""

import pytest

from duo.draft_service import openai_codec
from duo.draft_service.openai_codec import ApiError, InvalidField, ResponseHead
from duo.common.errors import InvalidArgument, ResourceExhausted, Unavailable, UpstreamError
from duo.common.events import BudgetSource, FinishedEvent, SessionStats
from duo.common.generation_spec import ChatMessage, ChatPrompt, ChatRole, TextPrompt, TokenIdsPrompt
from duo.common.stopping import FinishReason

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def chat(**fields):
    return openai_codec.chat_request({**CHAT, **fields}, default_max_tokens=512)


def test_a_chat_becomes_chat_messages_with_openais_defaults():
    call = openai_codec.chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": [
            {"type": "text", "text": "one "}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "ok"}]}, default_max_tokens=512)
    assert call.spec.prompt == ChatPrompt((ChatMessage(ChatRole.SYSTEM, "be brief"),
                                           ChatMessage(ChatRole.USER, "one two"),
                                           ChatMessage(ChatRole.ASSISTANT, "ok")))
    assert call.model == "m" and not call.stream and not call.include_usage
    assert call.spec.decoding.temperature == 1.0  # OpenAI samples unless told otherwise
    assert call.spec.stopping.max_new_tokens == 512  # a chat runs to the service's limit
    assert call.spec.budget is None  # the service's controller chooses


def test_sampling_stopping_and_streaming_fields_are_honoured():
    call = chat(temperature=0, top_p=0.5, seed=3, stop="END", max_completion_tokens=7, stream=True,
                stream_options={"include_usage": True}, top_k=-1, ignore_eos=True)
    assert (call.spec.decoding.temperature, call.spec.decoding.top_p, call.spec.decoding.seed) == (0.0, 0.5, 3)
    assert call.spec.decoding.top_k == 0
    assert call.spec.stopping.stop_strings == ("END",) and call.spec.stopping.max_new_tokens == 7
    assert call.spec.stopping.ignore_eos and call.stream and call.include_usage
    assert chat(stop=["a", "b"]).spec.stopping.stop_strings == ("a", "b")
    assert chat(max_tokens=9, max_completion_tokens=9).spec.stopping.max_new_tokens == 9


def test_completions_take_raw_text_or_token_ids_and_default_to_16_tokens():
    text = openai_codec.completion_request({"prompt": "w1 w2"})
    assert text.spec.prompt == TextPrompt("w1 w2", apply_chat_template=False)  # no chat template on raw text
    assert text.spec.stopping.max_new_tokens == 16
    assert openai_codec.completion_request({"prompt": [1, 5]}).spec.prompt == TokenIdsPrompt((1, 5))
    assert openai_codec.completion_request({"prompt": [[1, 5]]}).spec.prompt == TokenIdsPrompt((1, 5))
    assert openai_codec.completion_request({"prompt": ["w1"]}).spec.prompt == TextPrompt("w1", False)


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("tools", [{"type": "function"}]), ("tool_choice", "auto"), ("logit_bias", {"5": 1}),
    ("logprobs", True), ("top_logprobs", 2), ("response_format", {"type": "json_object"}),
    ("functions", [{"name": "f"}]), ("presence_penalty", 0.5), ("frequency_penalty", -1), ("no_such_field", 1),
])
def test_unsupported_fields_are_refused_by_name(field, value):
    with pytest.raises(InvalidField) as caught:
        chat(**{field: value})
    assert caught.value.param == field and field in str(caught.value)


@pytest.mark.parametrize("fields", [
    {"n": 1}, {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"logprobs": False}, {"user": "alice"},
    {"tools": None}, {"seed": None},
])
def test_fields_that_ask_for_nothing_are_accepted(fields):
    assert chat(**fields).spec.prompt == ChatPrompt((ChatMessage(ChatRole.USER, "hi"),))


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
    ({**CHAT, "temperature": -1}, "temperature"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "top_p": 1.5}, "top_p"),
    ({**CHAT, "seed": -1}, "seed"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({**CHAT, "stop": [1]}, "stop"),
    ({**CHAT, "stop": ["x"] * 17}, "stop"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({**CHAT, "model": 5}, "model"),
])
def test_bad_chat_requests_name_the_field(body, param):
    with pytest.raises(InvalidField) as caught:
        openai_codec.chat_request(body, default_max_tokens=64)
    assert caught.value.param == param, str(caught.value)


@pytest.mark.parametrize("prompt", [["w1", "w2"], [[1], [2]], [], None, [1, "w"], [True]])
def test_completion_prompts_other_than_one_text_or_one_list_of_ids_are_refused(prompt):
    with pytest.raises(InvalidField) as caught:
        openai_codec.completion_request({"prompt": prompt})
    assert caught.value.param == "prompt"


def test_a_body_that_is_not_an_object_is_refused():
    with pytest.raises(InvalidArgument):
        openai_codec.completion_request(["not", "an", "object"])


def finished(reason, new_tokens=5, rounds=2) -> FinishedEvent:
    stats = SessionStats(prompt_tokens=7, new_tokens=new_tokens, rounds=rounds, drafted_tokens=8, accepted_tokens=6,
                         final_draft_budget=4, draft_budget_source=BudgetSource.SERVICE)
    return FinishedEvent(reason, "text", stats)


@pytest.mark.parametrize("reason, expected", [
    (FinishReason.EOS, "stop"), (FinishReason.STOP, "stop"), (FinishReason.LENGTH, "length")])
def test_finish_reasons_are_openais_two(reason, expected):
    assert openai_codec.finish_reason(reason) == expected


def test_a_chat_answer_has_openais_shape_with_usage_and_duos_numbers_beside_it():
    head = ResponseHead("chatcmpl-1", 100, "target", chat=True)
    body = openai_codec.response(head, finished(FinishReason.EOS))
    assert body["object"] == "chat.completion" and body["model"] == "target"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "text"}, "logprobs": None,
                                "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    duo = body["duo"]
    assert duo["tokens_per_round"] == 2.0 and duo["acceptance_rate"] == 0.75
    assert duo["draft_budget"] == 4 and duo["draft_budget_source"] == "service"


def test_a_stream_opens_with_the_role_and_ends_with_the_reason_then_the_usage_when_asked():
    head = ResponseHead("chatcmpl-1", 100, "target", chat=True)
    assert openai_codec.stream_opening(head)[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert openai_codec.stream_text(head, "w1")["choices"][0]["delta"] == {"content": "w1"}
    last, usage = openai_codec.stream_finish(head, finished(FinishReason.LENGTH), include_usage=True)
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"] is None and "duo" in last
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 12
    assert len(openai_codec.stream_finish(head, finished(FinishReason.LENGTH), include_usage=False)) == 1
    completion = ResponseHead("cmpl-1", 100, "target", chat=False)
    assert openai_codec.stream_opening(completion) == []
    assert openai_codec.stream_text(completion, "w1")["choices"][0]["text"] == "w1"


@pytest.mark.parametrize("error, status, kind", [
    (InvalidField("top_p", "top_p must be in (0, 1]"), 400, "invalid_request_error"),
    (InvalidArgument("the prompt is empty"), 400, "invalid_request_error"),
    (ResourceExhausted("this service already runs 1 sessions"), 429, "rate_limit_error"),
    (Unavailable("the draft model is still loading"), 503, "service_unavailable_error"),
    (UpstreamError("UNAVAILABLE", "verify service: UNAVAILABLE: gone"), 503, "service_unavailable_error"),
    (UpstreamError("INVALID_ARGUMENT", "verify service: INVALID_ARGUMENT: x"), 502, "server_error"),
    (ApiError(401, "missing or wrong bearer token", "authentication_error", "invalid_api_key"), 401,
     "authentication_error"),
    (RuntimeError("boom"), 500, "server_error"),
])
def test_errors_get_their_http_status_and_openais_error_shape(error, status, kind):
    got_status, body = openai_codec.error_body(error)
    assert got_status == status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["type"] == kind
    assert str(error) in body["error"]["message"]
    if isinstance(error, InvalidField):
        assert body["error"]["param"] == "top_p"
