"""Fuzz: random malformed proposals and requests, fed to both services, get a refusal with a status that
names the caller's mistake (or are served), never INTERNAL or UNKNOWN, and the services serve normally
afterwards. Seeded, so a failure reproduces."""

import math
import random

import grpc
import numpy as np
import pytest

from duo.protos import duo_pb2 as pb
from duo.protos import duo_pb2_grpc
from tests.inprocess import running_pair
from tests.polling import eventually
from tests.tiny_models import VOCAB_SIZE, save_pair

CALLERS_MISTAKES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.RESOURCE_EXHAUSTED}
ODD_FLOATS = [0.0, 1e-45, -1.0, math.nan, math.inf, -math.inf, 0.7, 1.0, 2.0, 1e10]


def odd_token(rng: random.Random) -> int:
    return rng.choice([rng.randrange(VOCAB_SIZE), rng.randrange(VOCAB_SIZE), -1, VOCAB_SIZE, 2**31 - 1])


def random_decoding(rng: random.Random) -> pb.DecodingParams:
    decoding = pb.DecodingParams(temperature=rng.choice(ODD_FLOATS), top_k=rng.choice([0, 1, 5, 2**32 - 1]),
                                 top_p=rng.choice(ODD_FLOATS))
    if rng.random() < 0.5:
        decoding.seed = rng.randrange(2**64)
    return decoding


def random_distribution(rng: random.Random) -> pb.DraftDistribution:
    size = rng.choice([VOCAB_SIZE, VOCAB_SIZE, VOCAB_SIZE - 1, 0, 3])
    probs = np.random.default_rng(rng.randrange(2**32)).random(size).astype(np.float32)
    kind = rng.choice(["normalised", "scaled", "nan", "negative", "zero"])
    if kind == "normalised" and size:
        probs /= probs.sum()
    elif kind == "scaled":
        probs *= 5
    elif kind == "nan" and size:
        probs[rng.randrange(size)] = np.nan
    elif kind == "negative" and size:
        probs[rng.randrange(size)] = -0.5
    elif kind == "zero":
        probs[:] = 0
    return pb.DraftDistribution(probs_f32=probs.tobytes())


def random_tree(rng: random.Random) -> pb.TokenTree:
    size = rng.choice([0, 1, 2, 4, 9, 70])
    tree = pb.TokenTree(token_ids=[odd_token(rng) for _ in range(size)],
                        parent_indices=[rng.choice([i - 1, -1, rng.randrange(-2, size + 2)]) for i in range(size)])
    if rng.random() < 0.3:
        del tree.parent_indices[-1:]  # one parent short
    if rng.random() < 0.4:
        tree.draft_distributions.extend(random_distribution(rng) for _ in range(rng.choice([size, size, 1])))
    return tree


def sane_tree(rng: random.Random) -> pb.TokenTree:
    size = rng.randrange(1, 5)
    return pb.TokenTree(token_ids=[rng.randrange(VOCAB_SIZE) for _ in range(size)],
                        parent_indices=[rng.randrange(-1, i) for i in range(size)])


def random_verify_stream(rng: random.Random) -> list[pb.VerifyRequest]:
    if rng.random() < 0.25:  # a well-formed greedy session among the malformed ones
        return [pb.VerifyRequest(open=pb.VerifyOpen(prompt_token_ids=[rng.randrange(VOCAB_SIZE) for _ in range(4)])),
                *[pb.VerifyRequest(proposal=pb.Proposal(round=n, tree=sane_tree(rng))) for n in (1, 2)]]
    prompt = [odd_token(rng) for _ in range(rng.choice([0, 1, 3, 10, 300]))]
    requests = [pb.VerifyRequest(open=pb.VerifyOpen(session_id=rng.choice(["", "s", "x" * 200, "a\nb"]),
                                                    prompt_token_ids=prompt, decoding=random_decoding(rng)))]
    for number in range(1, rng.randrange(1, 4)):
        kind = rng.random()
        if kind < 0.1:
            requests.append(requests[0])  # a second opening
        else:
            round_number = number if kind < 0.8 else rng.choice([0, number + 1, 2**63])
            requests.append(pb.VerifyRequest(proposal=pb.Proposal(round=round_number, tree=random_tree(rng))))
    if rng.random() < 0.1:
        requests.reverse()  # a proposal before the opening
    return requests


def random_generate_request(rng: random.Random) -> pb.GenerateRequest:
    request = pb.GenerateRequest(decoding=random_decoding(rng), request_id=rng.choice(["", "id", "a\nb", "x" * 300]),
                                 stopping=pb.StoppingParams(max_new_tokens=rng.choice([0, 1, 4, 10**6]),
                                                            stop_strings=rng.choice([[], ["w3"], [""], ["x" * 5000]]),
                                                            ignore_eos=rng.random() < 0.5))
    kind = rng.random()
    if kind < 0.4:
        request.token_ids.ids.extend(odd_token(rng) for _ in range(rng.choice([0, 2, 5, 400])))
    elif kind < 0.8:
        request.text = rng.choice(["", "w1 w2", "w1 " * 500, "\x00\uffff"])
    if rng.random() < 0.5:
        request.budget.max_draft_tokens = rng.choice([0, 2, 8, 70, 2**32 - 1])
        request.budget.max_branches = rng.choice([0, 1, 3, 9, 2**32 - 1])
    return request


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() in CALLERS_MISTAKES, f"{exc.code().name}: {exc.details()}"
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    pair = save_pair(tmp_path_factory.mktemp("fuzz"), "llama")
    with running_pair(pair.target_dir, pair.draft_dir) as running:
        yield running


def test_random_malformed_verify_streams_are_refused_cleanly(services):
    rng = random.Random(20261201)
    with grpc.insecure_channel(services.verify_addr) as channel:
        stub = duo_pb2_grpc.VerifierStub(channel)
        seen = {status_of(lambda: list(stub.Verify(iter(random_verify_stream(rng)), timeout=30))) for _ in range(150)}
        assert eventually(lambda: len(services.verify_sessions) == 0)
        good = [pb.VerifyRequest(open=pb.VerifyOpen(prompt_token_ids=[1, 5, 9])),
                pb.VerifyRequest(proposal=pb.Proposal(round=1, tree=pb.TokenTree(token_ids=[5], parent_indices=[-1])))]
        assert [r.WhichOneof("message") for r in stub.Verify(iter(good), timeout=30)] == ["prefilled", "verdict"]
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION} <= seen


def test_random_malformed_generate_requests_are_refused_cleanly(services):
    rng = random.Random(1201)
    with grpc.insecure_channel(services.draft_addr) as channel:
        stub = duo_pb2_grpc.DrafterStub(channel)
        seen = {status_of(lambda: list(stub.Generate(random_generate_request(rng), timeout=60))) for _ in range(120)}
        assert eventually(lambda: len(services.draft_sessions) == 0 and len(services.verify_sessions) == 0)
        good = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5, 9]), stopping=pb.StoppingParams(max_new_tokens=6))
        assert list(stub.Generate(good, timeout=60))[-1].finished.stats.new_tokens == 6
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= seen
