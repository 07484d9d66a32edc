"""Chat messages in the gRPC contract: a conversation goes through the tokenizer's chat template (in one
place, the draft service's PromptEncoder) and the output is the target's own; the limits hold; and
``duo-client generate --system`` sends a system message before the prompt."""

import json

import grpc
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from duo.client.cli import main
from duo.draft_service import prompts
from duo.draft_service.prompts import PromptEncoder
from duo.common import codec
from duo.common.errors import InvalidArgument
from duo.common.events import FinishedEvent
from duo.common.generation_spec import ChatMessage, ChatRole
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.inprocess import running_pair
from tests.tiny_models import CHAT_TEMPLATE, DEFAULT_EOS, reference_greedy, save_pair, word_tokenizer

CONVERSATION = [("system", "w3 w4"), ("user", "w5 w6 w7"), ("assistant", "w8"), ("user", "w9 w10")]


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    pair = save_pair(tmp_path_factory.mktemp("chat"), "llama", chat_template=CHAT_TEMPLATE)
    with running_pair(pair.target_dir, pair.draft_dir) as services:
        yield pair, services


def templated(pair, conversation) -> list[int]:
    """The prompt ids the target's own tokenizer (as saved) makes of a conversation."""
    tokenizer = AutoTokenizer.from_pretrained(pair.target_dir)
    return tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in conversation],
                                         add_generation_prompt=True, tokenize=True, return_dict=False)


def chat_request(conversation, **fields) -> pb.GenerateRequest:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role=role, content=content) for role, content in conversation])
    return pb.GenerateRequest(messages=messages, **fields)


def generate(address, request):
    with grpc.insecure_channel(address) as channel:
        messages = list(duo_pb2_grpc.DrafterStub(channel).Generate(request, timeout=60))
    events = [codec.event_from_pb(message) for message in messages[1:]]
    tokens = [token for event in events[:-1] for token in event.token_ids]
    return messages[0].started, tokens, events[-1]


def test_a_conversation_goes_through_the_chat_template_and_the_output_is_the_targets(chat_pair):
    pair, services = chat_pair
    prompt = templated(pair, CONVERSATION)
    started, tokens, finished = generate(services.draft_addr, chat_request(
        CONVERSATION, stopping=pb.StoppingParams(max_new_tokens=40), budget=pb.DraftBudget(max_draft_tokens=4)))
    assert started.prompt_tokens == len(prompt)
    assert isinstance(finished, FinishedEvent) and finished.stats.drafted_tokens > 0
    assert tokens == reference_greedy(pair.target, prompt, 40, eos_token_id=DEFAULT_EOS)


def test_a_text_prompt_with_the_template_is_the_chat_of_one_user_message(chat_pair):
    pair, services = chat_pair
    stopping = pb.StoppingParams(max_new_tokens=12)
    _, as_text, _ = generate(services.draft_addr, pb.GenerateRequest(text="w5 w6", stopping=stopping))
    _, as_chat, _ = generate(services.draft_addr, chat_request([("user", "w5 w6")], stopping=stopping))
    assert as_text == as_chat


@pytest.mark.parametrize("conversation, fields, fragment", [
    ([], {}, "no messages"),
    ([("tool", "w1")], {}, "role 'tool'"),
    ([("user", "w1")], {"apply_chat_template": False}, "always go through the chat template"),
    ([("user", "w1 " * 400)], {}, "context"),
])
def test_bad_conversations_are_invalid_arguments(chat_pair, conversation, fields, fragment):
    _, services = chat_pair
    with pytest.raises(grpc.RpcError) as caught:
        generate(services.draft_addr, chat_request(conversation, stopping=pb.StoppingParams(max_new_tokens=4),
                                                   **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()


def test_a_chats_size_is_bounded_in_messages_and_characters(monkeypatch):
    encoder = PromptEncoder(word_tokenizer(chat_template=CHAT_TEMPLATE))
    monkeypatch.setattr(prompts, "MAX_CHAT_MESSAGES", 3)
    monkeypatch.setattr(prompts, "MAX_PROMPT_CHARS", 10)
    user = ChatMessage(ChatRole.USER, "w1")
    assert encoder.encode_chat((user,) * 3)
    with pytest.raises(InvalidArgument, match="4 messages; the limit is 3"):
        encoder.encode_chat((user,) * 4)
    with pytest.raises(InvalidArgument, match="11 characters; the limit is 10"):
        encoder.encode_chat((ChatMessage(ChatRole.USER, "w1 w2 w3 w4"),))


def test_a_tokenizer_without_a_chat_template_refuses_a_chat():
    with pytest.raises(InvalidArgument, match="no chat template"):
        PromptEncoder(word_tokenizer()).encode_chat((ChatMessage(ChatRole.USER, "w1"),))


def test_duo_client_system_sends_a_system_message_before_the_prompt(chat_pair):
    pair, services = chat_pair
    result = CliRunner().invoke(main, ["generate", "--draft-addr", services.draft_addr, "--json", "--system",
                                       "w3 w4", "--max-new-tokens", "10", "w5 w6"])
    assert result.exit_code == 0, result.output
    output = json.loads(result.output)
    prompt = templated(pair, [("system", "w3 w4"), ("user", "w5 w6")])
    assert output["stats"]["prompt_tokens"] == len(prompt)
    assert output["token_ids"] == reference_greedy(pair.target, prompt, 10, eos_token_id=DEFAULT_EOS)


def test_duo_client_system_needs_the_chat_template():
    result = CliRunner().invoke(main, ["generate", "--system", "be brief", "--no-chat", "hi"])
    assert result.exit_code == 2 and "--system needs the chat template" in result.output
