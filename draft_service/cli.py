"""``duo-draft serve``: the draft service's command line."""

from __future__ import annotations

import logging
import sys
import time

import click
import grpc

from draft_service.servicer import DrafterConfig, DrafterServicer
from duo_common.default_models import DEFAULT_DRAFT
from duo_common.errors import FailedPrecondition, Unavailable
from duo_common.models import load_causal_lm
from duo_common.rpc import MAX_MESSAGE_BYTES, ServiceServer
from duo_common.serve_cli import announce_port, common_serve_options, setup_process
from duo_common.sessions import SessionRegistry
from protos import duo_pb2_grpc

log = logging.getLogger("duo.draft")


@click.group()
def main() -> None:
    """duo draft service: the draft model and the speculative loop."""


@main.command()
@click.option("--model", default=DEFAULT_DRAFT, show_default=True, envvar="DUO_DRAFT_MODEL",
              help="Draft model: hub id, local folder or builtin name.")
@click.option("--verify-addr", required=True, envvar="DUO_DRAFT_VERIFY_ADDR",
              help="HOST:PORT of the verify service.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, envvar="DUO_DRAFT_DTYPE")
@click.option("--default-budget", type=click.IntRange(0, 1024), default=4, show_default=True,
              envvar="DUO_DRAFT_DEFAULT_BUDGET", help="Draft tokens per round when a request sets none.")
@click.option("--verify-timeout-s", type=click.FloatRange(0.1), default=120.0, show_default=True,
              envvar="DUO_DRAFT_VERIFY_TIMEOUT_S", help="Longest wait for one verifier answer.")
@click.option("--verify-wait-s", type=click.FloatRange(0), default=600.0, show_default=True,
              envvar="DUO_DRAFT_VERIFY_WAIT_S", help="How long start-up waits for the verify service.")
@click.option("--max-new-tokens-limit", type=click.IntRange(1), default=4096, show_default=True,
              envvar="DUO_DRAFT_MAX_NEW_TOKENS_LIMIT", help="Largest max_new_tokens a request may ask for.")
@common_serve_options("DUO_DRAFT")
def serve(model, verify_addr, dtype, default_budget, verify_timeout_s, verify_wait_s, max_new_tokens_limit,
          host, port, threads, max_sessions, grace_s, port_file, log_level):
    """Serve the Drafter RPCs (Session, Generate, GetModelInfo)."""
    setup_process(threads, log_level)
    channel = grpc.insecure_channel(verify_addr, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    config = DrafterConfig(default_budget, verify_timeout_s, max_new_tokens_limit)
    servicer = DrafterServicer(config, channel, SessionRegistry(max_sessions))
    server = ServiceServer(["duo.v1.Drafter"])
    duo_pb2_grpc.add_DrafterServicer_to_server(servicer, server.server)
    bound = server.bind(f"{host}:{port}")
    server.start()
    announce_port(port_file, bound)  # readiness is health's job; the port is known now
    log.info("listening on %s:%d; loading %s", host, bound, model)
    servicer.attach(load_causal_lm(model, "cpu", dtype))
    _wait_for_compatible_verifier(servicer, verify_addr, verify_wait_s)
    server.mark_serving()
    log.info("serving; verifier at %s", verify_addr)
    server.serve_until_signal(grace_s)


def _wait_for_compatible_verifier(servicer: DrafterServicer, verify_addr: str, wait_s: float) -> None:
    """Refuse to serve an incompatible pair; wait (a while) for a verifier that is still starting."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            target = servicer.target_info()
            log.info("verifier %s runs %s: compatible", verify_addr, target.model_name)
            return
        except FailedPrecondition as exc:
            log.error("%s", exc)
            sys.exit(2)
        except Unavailable as exc:
            if time.monotonic() > deadline:
                log.error("verify service at %s unavailable for %.0f s: %s", verify_addr, wait_s, exc)
                sys.exit(3)
            time.sleep(0.5)


if __name__ == "__main__":
    main()
