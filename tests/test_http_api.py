"""The draft service's OpenAI-compatible HTTP API with real clients — the openai SDK, and raw HTTP for the
wire format — against a live draft + verify pair on tiny models: chat and completions, streamed or not, stop
strings, seeds, usage, refusals with OpenAI's error shape (400, 401, 404, 429, 503), a client that hangs up
mid-stream, and greedy output equal to the gRPC API's and to the target's alone."""

import http.client
import json
import logging
import re
import signal
import socket
import ssl
import threading
import urllib.parse

import grpc
import openai
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from duo.draft_service.http_api import build_app
from duo.draft_service.http_server import HttpServer
from duo.draft_service.readiness import ServingState
from duo.draft_service.session_factory import DrafterConfig, SessionFactory
from duo.common.rpc import ServerOptions
from duo.common.security import ServerTls
from duo.common.sessions import SessionRegistry
from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.certs import make_certs
from tests.inprocess import running_pair, verify_server
from tests.polling import eventually
from tests.tiny_models import CHAT_TEMPLATE, DEFAULT_EOS, reference_greedy, save_pair

TOKEN = "http-s3cret"
CHAT = [{"role": "system", "content": "w3 w4"}, {"role": "user", "content": "w5 w6 w7"}]
PROMPT_IDS = [5, 9, 20, 31]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("http"), "llama", chat_template=CHAT_TEMPLATE, context=2048)


@pytest.fixture(scope="module")
def services(pair):
    # A fixed default budget: every request speculates (the controller may find no drafting best on tiny models).
    with running_pair(pair.target_dir, pair.draft_dir, http=True, config=DrafterConfig(default_budget=4)) as running:
        yield running


@pytest.fixture(scope="module")
def client(services) -> OpenAI:
    return OpenAI(base_url=services.http_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client) -> str:
    (served,) = client.models.list().data
    return served.id


def prompt_of(pair, messages) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(pair.target_dir)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def target_text(pair, prompt, max_tokens) -> tuple[str, list[int]]:
    """What the target alone says, greedy: the text and the token ids."""
    ids = reference_greedy(pair.target, prompt, max_tokens, eos_token_id=DEFAULT_EOS)
    return AutoTokenizer.from_pretrained(pair.target_dir).decode(ids, skip_special_tokens=True), ids


def grpc_text(services, request: pb.GenerateRequest) -> str:
    with grpc.insecure_channel(services.draft_addr) as channel:
        return list(duo_pb2_grpc.DrafterStub(channel).Generate(request, timeout=60))[-1].finished.text


def raw(url: str, method: str, path: str, body=None, headers=None) -> tuple[int, dict, str]:
    """One HTTP request without any client library: status, headers and body text."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, parts.path.removesuffix("/v1") + path, data,
                       {"content-type": "application/json", **(headers or {})})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    return response.status, dict(response.getheaders()), text


def test_greedy_chat_over_http_is_the_targets_and_the_grpc_apis(pair, services, client, model):
    prompt = prompt_of(pair, CHAT)
    expected, ids = target_text(pair, prompt, 40)
    answer = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=40)
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == ("stop" if ids[-1] == DEFAULT_EOS else "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(ids))
    assert answer.usage.total_tokens == len(prompt) + len(ids)
    assert answer.duo["drafted_tokens"] > 0 and 0 <= answer.duo["acceptance_rate"] <= 1  # it speculated
    messages = pb.ChatMessages(messages=[pb.ChatMessage(**message) for message in CHAT])
    assert grpc_text(services, pb.GenerateRequest(messages=messages, stopping=pb.StoppingParams(max_new_tokens=40))) \
        == expected


def test_a_streamed_chat_is_the_same_answer_in_pieces_ending_with_the_usage(client, model):
    whole = client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) \
        == whole.choices[0].message.content
    *_, last, usage = chunks
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason and "tokens_per_round" in last.duo
    assert usage.choices == [] and usage.usage == whole.usage
    assert {chunk.id for chunk in chunks} == {chunks[0].id}


def test_completions_take_text_or_token_ids_streamed_or_not(pair, client, model):
    expected, _ = target_text(pair, PROMPT_IDS, 30)
    as_ids = client.completions.create(model=model, prompt=PROMPT_IDS, temperature=0, max_tokens=30)
    assert as_ids.choices[0].text == expected and as_ids.usage.prompt_tokens == len(PROMPT_IDS)
    as_text = client.completions.create(model=model, prompt="w2 w6 w17 w28", temperature=0, max_tokens=30)
    assert as_text.choices[0].text == expected  # raw text: w2 w6 w17 w28 are ids 5 9 20 31, no chat template
    streamed = client.completions.create(model=model, prompt=PROMPT_IDS, temperature=0, max_tokens=30, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    assert client.completions.create(model=model, prompt=PROMPT_IDS, temperature=0).usage.completion_tokens <= 16


def test_the_stream_is_server_sent_events_ending_with_done(services):
    status, headers, body = raw(services.http_url, "POST", "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in body.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_stop_string_cuts_the_answer_before_it_and_says_stop(client, model):
    full = client.completions.create(model=model, prompt=PROMPT_IDS, temperature=0, max_tokens=40,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    assert len(words) >= 10
    for stop in (words[6], [words[8], words[5]]):
        answer = client.completions.create(model=model, prompt=PROMPT_IDS, temperature=0, max_tokens=40, stop=stop,
                                           extra_body={"ignore_eos": True})
        first = min(full.find(word) for word in ([stop] if isinstance(stop, str) else stop))
        assert answer.choices[0].text == full[:first]
        assert answer.choices[0].finish_reason == "stop"


def test_a_seed_reproduces_a_sampled_answer(client, model):
    def sampled(seed):
        return client.chat.completions.create(model=model, messages=CHAT, temperature=1.0, top_p=0.95, seed=seed,
                                              max_tokens=24).choices[0].message.content

    assert sampled(11) == sampled(11)
    assert len({sampled(seed) for seed in range(1, 5)}) > 1  # the seed does choose the samples


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("logit_bias", {"5": 10}), ("logprobs", True), ("response_format", {"type": "json_object"}),
    ("presence_penalty", 0.5), ("frequency_penalty", 1.0), ("functions", [{"name": "f"}]), ("no_such_field", 1),
])
def test_unsupported_fields_are_refused_with_400_naming_them(client, model, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, extra_body={field: value})
    assert caught.value.status_code == 400 and caught.value.param == field
    assert field in caught.value.message and caught.value.type == "invalid_request_error"


def test_fields_that_ask_for_nothing_are_accepted(client, model):
    answer = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, n=1, presence_penalty=0,
                                            frequency_penalty=0, logprobs=False, user="alice")
    assert answer.usage.completion_tokens >= 1


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "tool", "content": "w1"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
])
def test_bad_chats_are_refused_with_400(client, model, messages, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    assert caught.value.param == param


def test_bad_values_and_unknown_models_get_their_status(services, client, model):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=CHAT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="batches of prompts"):
        client.completions.create(model=model, prompt=["w1", "w2"])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=model, prompt=[5] * 3000)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert caught.value.code == "model_not_found"
    status, _, body = raw(services.http_url, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = raw(services.http_url, "GET", "/v1/no-such-route")
    assert status == 404 and "error" in json.loads(body)


def test_a_client_that_hangs_up_mid_stream_frees_the_session_on_both_services(services, client, model, caplog):
    caplog.set_level(logging.INFO, logger="duo.draft_service.session_factory")
    stream = client.completions.create(model=model, prompt=PROMPT_IDS, temperature=0, max_tokens=1900, stream=True,
                                       extra_body={"ignore_eos": True})  # seconds of work, were it left to run
    received = [next(stream) for _ in range(3)]
    assert all(chunk.choices[0].finish_reason is None for chunk in received)
    assert len(services.draft_sessions) == 1 and len(services.verify_sessions) == 1
    stream.close()
    assert eventually(lambda: len(services.draft_sessions) == 0 and len(services.verify_sessions) == 0)
    assert "prompt tokens, budget" in caplog.text  # the session started…
    assert not re.search(r"session \S+: \d+ tokens \(", caplog.text)  # …and was freed without finishing


def test_health_says_ok_while_the_service_serves(services):
    status, _, body = raw(services.http_url, "GET", "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


# ───────────────── a service with a bearer token, one session at most, and no chat template ─────────────────


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    pair = save_pair(tmp_path_factory.mktemp("http-guarded"), "llama")
    with running_pair(pair.target_dir, pair.draft_dir, http=True,
                      options=ServerOptions(max_sessions=1, auth_token=TOKEN)) as running:
        yield running


def test_the_bearer_token_is_required_when_the_service_has_one(guarded):
    with pytest.raises(openai.AuthenticationError) as caught:
        OpenAI(base_url=guarded.http_url, api_key="wrong", max_retries=0).models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    status, _, _ = raw(guarded.http_url, "POST", "/v1/completions", {"prompt": [5], "max_tokens": 2})  # no token
    assert status == 401
    good = OpenAI(base_url=guarded.http_url, api_key=TOKEN, max_retries=0)
    answer = good.completions.create(model=good.models.list().data[0].id, prompt=[5, 9], max_tokens=3)
    assert answer.usage.completion_tokens >= 1
    assert raw(guarded.http_url, "GET", "/health")[0] == 200  # probes carry no token


def test_sessions_beyond_the_limit_are_refused_with_429_and_http_shares_grpcs_limit(guarded):
    client = OpenAI(base_url=guarded.http_url, api_key=TOKEN, max_retries=0)
    release = threading.Event()
    with grpc.insecure_channel(guarded.draft_addr) as channel:
        def silent():  # a Session stream that never sends its opening: it holds the one session there is
            release.wait(30)
            return
            yield

        held = duo_pb2_grpc.DrafterStub(channel).Session(silent(), metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert eventually(lambda: len(guarded.draft_sessions) == 1)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=client.models.list().data[0].id, prompt=[5, 9], max_tokens=3)
        assert caught.value.status_code == 429 and "already runs 1 sessions" in caught.value.message
        release.set()
        with pytest.raises(grpc.RpcError):
            list(held)
    assert eventually(lambda: len(guarded.draft_sessions) == 0)
    assert client.completions.create(model=client.models.list().data[0].id, prompt=[5, 9], max_tokens=3).choices


def test_a_chat_on_a_model_without_a_chat_template_is_refused_with_400(guarded):
    client = OpenAI(base_url=guarded.http_url, api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT, max_tokens=3)


# ───────────────── before the model has loaded ─────────────────


def test_while_loading_health_and_calls_say_503_until_the_service_serves():
    factory = SessionFactory(DrafterConfig(), grpc.insecure_channel("127.0.0.1:1"))  # no model attached yet
    serving = ServingState()
    app = build_app(factory, SessionRegistry(4), serving, max_body_bytes=1000)
    server = HttpServer(app, "127.0.0.1", 0, grace_s=1.0)
    server.start()
    url = f"http://127.0.0.1:{server.port}/v1"
    try:
        status, _, body = raw(url, "GET", "/health")
        assert status == 503 and json.loads(body)["error"]["type"] == "service_unavailable_error"
        with pytest.raises(openai.InternalServerError) as caught:
            OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(model="m", messages=CHAT)
        assert caught.value.status_code == 503 and "still loading" in caught.value.message
        status, _, body = raw(url, "POST", "/v1/completions", {"prompt": "w1 " * 400})  # read before anything else
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
        serving.set(True)
        assert raw(url, "GET", "/health")[0] == 200
        serving.set(False)  # e.g. the verifier cannot be reached (readiness.follow_verifier)
        assert raw(url, "GET", "/health")[0] == 503
    finally:
        server.stop()


# ───────────────── duo-draft serve --http-port, as a process ─────────────────


def test_duo_draft_serve_with_an_http_port_serves_the_api_and_stops_with_the_service(tmp_path):
    from tests.test_shutdown import start, wait_serving

    pair = save_pair(tmp_path, "llama", chat_template=CHAT_TEMPLATE)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with socket.socket() as probe:  # a free port for the HTTP API
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{http_port}/v1"
    with verify_server(pair.target_dir) as (verify_addr, _):
        draft, draft_addr = start("duo.draft_service.cli", [
            "--model", str(pair.draft_dir), "--verify-addr", verify_addr, "--threads", "1",
            "--http-port", str(http_port), "--auth-token-file", str(token_file)], tmp_path, "draft")
        try:
            wait_serving(draft_addr)
            assert raw(url, "GET", "/health")[0] == 200
            assert raw(url, "GET", "/v1/models")[0] == 401  # the gRPC side's token guards the HTTP API too
            client = OpenAI(base_url=url, api_key=TOKEN, max_retries=0, timeout=60)
            chunks = list(client.chat.completions.create(model=client.models.list().data[0].id, messages=CHAT,
                                                         max_tokens=8, stream=True))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            draft.send_signal(signal.SIGTERM)
            assert draft.wait(60) == 0
            with pytest.raises(ConnectionRefusedError):
                raw(url, "GET", "/health")
        finally:
            if draft.poll() is None:
                draft.kill()
                draft.wait()


# ───────────────── TLS: the gRPC server's certificate serves HTTPS ─────────────────


def test_with_mutual_tls_the_api_is_https_and_wants_a_client_certificate(tmp_path):
    certs = make_certs(tmp_path)
    pair = save_pair(tmp_path / "models", "llama")
    tls = ServerTls(certs.server_cert, certs.server_key, client_ca=certs.ca)
    with running_pair(pair.target_dir, pair.draft_dir, http=True, options=ServerOptions(tls=tls)) as running:
        assert running.http_url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(certs.ca))
        trusted.load_cert_chain(certs.client_cert, certs.client_key)
        client = OpenAI(base_url=running.http_url, api_key="unused", max_retries=0,
                        http_client=openai.DefaultHttpxClient(verify=trusted))
        answer = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT_IDS, max_tokens=3)
        assert answer.usage.completion_tokens >= 1
        anonymous = OpenAI(base_url=running.http_url, api_key="unused", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(certs.ca))))
        with pytest.raises(openai.APIConnectionError):
            anonymous.models.list()
