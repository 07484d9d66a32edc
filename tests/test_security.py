"""TLS and mutual TLS on both hops, and the bearer token: a good client generates, others are refused."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common.params import StoppingParams
from duo.common.rpc import ServerOptions
from duo.common.security import ChannelSecurity, ServerTls
from tests.certs import make_certs
from tests.inprocess import draft_server, verify_server
from tests.tiny_models import reference_greedy, save_pair

TOKEN = "s3cret-token"
PROMPT = (1, 5, 9, 20)


@pytest.fixture(scope="module")
def secure_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    certs = make_certs(root)
    pair = save_pair(root / "models", "llama")
    mutual_tls = ServerTls(certs.server_cert, certs.server_key, client_ca=certs.ca)
    to_verifier = ChannelSecurity(certs.ca, certs.client_cert, certs.client_key, token=TOKEN)
    with verify_server(pair.target_dir, options=ServerOptions(tls=mutual_tls, auth_token=TOKEN)) as (verify_addr, _), \
            draft_server(pair.draft_dir, verify_addr, options=ServerOptions(tls=mutual_tls, auth_token=TOKEN),
                         verify_security=to_verifier) as (draft_addr, _):
        yield certs, pair, draft_addr, verify_addr


def generate(address, security: ChannelSecurity):
    with security.channel(address) as channel:
        request = GenerationRequest(prompt_ids=PROMPT, stopping=StoppingParams(max_new_tokens=12))
        return Orchestrator(channel, timeout_s=20, metadata=security.metadata).generate(request, FixedBudget(3))


def test_generation_over_mutual_tls_with_token_succeeds_and_is_lossless(secure_pair):
    certs, pair, draft_addr, _ = secure_pair
    result = generate(draft_addr, ChannelSecurity(certs.ca, certs.client_cert, certs.client_key, token=TOKEN))
    assert result.token_ids == reference_greedy(pair.target, list(PROMPT), 12, eos_token_id=2)


@pytest.mark.parametrize("client", ["no-certificate", "rogue-certificate", "plaintext"])
def test_client_without_a_valid_certificate_is_refused(secure_pair, client):
    certs, _, draft_addr, _ = secure_pair
    security = {
        "no-certificate": ChannelSecurity(certs.ca, token=TOKEN),
        "rogue-certificate": ChannelSecurity(certs.ca, certs.rogue_cert, certs.rogue_key, token=TOKEN),
        "plaintext": ChannelSecurity(token=TOKEN),
    }[client]
    with pytest.raises(grpc.RpcError) as caught:
        generate(draft_addr, security)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_client_without_the_token_is_refused(secure_pair, token):
    certs, _, draft_addr, _ = secure_pair
    with pytest.raises(grpc.RpcError) as caught:
        generate(draft_addr, ChannelSecurity(certs.ca, certs.client_cert, certs.client_key, token=token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_verifier_refuses_a_drafter_without_client_certificate(secure_pair):
    certs, _, _, verify_addr = secure_pair
    with ChannelSecurity(certs.ca, token=TOKEN).channel(verify_addr) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            from duo.protos import duo_pb2, duo_pb2_grpc

            duo_pb2_grpc.VerifierStub(channel).GetModelInfo(duo_pb2.ModelInfoRequest(), timeout=10,
                                                           metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token(secure_pair):
    certs, _, draft_addr, _ = secure_pair
    with ChannelSecurity(certs.ca, certs.client_cert, certs.client_key).channel(draft_addr) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
